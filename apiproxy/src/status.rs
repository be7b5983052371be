//! Errors as Kubernetes `Status` objects, so kubectl prints them like the API server's own.

use bytes::Bytes;
use http::{Response, StatusCode, header};

use crate::ProxyBody;

pub fn status(code: StatusCode, reason: &str, message: &str) -> Response<ProxyBody> {
    let body = serde_json::json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    });
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "application/json")
        .body(crate::full(Bytes::from(body.to_string())))
        .expect("static response")
}
