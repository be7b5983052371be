//! The API proxy: paths, headers, bodies and credentials a hostile client sends.
