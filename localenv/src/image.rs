//! Container images without a registry: a root filesystem of local files written as a
//! `docker save` tarball (one layer, a config, a manifest naming the image), imported into the
//! real node's containerd under the exact name manifests ask for. Tarballs are cached by the
//! content of what goes in, so an unchanged image is not written again.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::{Error, Result, io_err};

/// One image: files from this machine at paths of the image, and how it starts.
#[derive(Clone, Debug, Default)]
pub struct ImageSpec {
    /// The full reference, e.g. `registry.k8s.io/pause:3.10.1`.
    pub name: String,
    /// (path in the image, file on this machine); executables keep their mode.
    pub files: Vec<(String, PathBuf)>,
    /// (path in the image, contents).
    pub texts: Vec<(String, String)>,
    /// (link in the image, target).
    pub symlinks: Vec<(String, String)>,
    /// Empty directories (mode 1777 for `/tmp`, else 0755).
    pub dirs: Vec<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
}

impl ImageSpec {
    pub fn new(name: &str) -> Self {
        ImageSpec { name: name.into(), env: vec!["PATH=/usr/local/bin:/usr/bin:/bin".into()], ..Default::default() }
    }

    /// Hash of everything that goes into the tarball: the cache key.
    fn key(&self) -> Result<String> {
        let mut h = Sha256::new();
        h.update(format!("{:?}", (&self.name, &self.texts, &self.symlinks, &self.dirs)));
        h.update(format!("{:?}", (&self.entrypoint, &self.cmd, &self.env)));
        for (path, src) in &self.files {
            h.update(path.as_bytes());
            let mut f = std::fs::File::open(src).map_err(io_err(format!("reading {}", src.display())))?;
            std::io::copy(&mut f, &mut h).map_err(io_err(format!("reading {}", src.display())))?;
        }
        Ok(hex(&h.finalize()))
    }

    /// Writes the image's tarball into `cache` (unless an identical one is there) and returns
    /// its path.
    pub fn build(&self, cache: &Path) -> Result<PathBuf> {
        std::fs::create_dir_all(cache).map_err(io_err(format!("creating {}", cache.display())))?;
        let key = self.key()?;
        let out = cache.join(format!("{}-{}.tar", sanitize(&self.name), &key[..16]));
        if out.exists() {
            return Ok(out);
        }
        let layer_path = out.with_extension("layer.tmp");
        let diff_id = {
            let file =
                std::fs::File::create(&layer_path).map_err(io_err(format!("creating {}", layer_path.display())))?;
            let mut hashing = Hashing { inner: file, hash: Sha256::new() };
            self.write_layer(&mut hashing)?;
            hex(&hashing.hash.finalize())
        };
        let config = serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "config": {"Entrypoint": self.entrypoint, "Cmd": self.cmd, "Env": self.env, "WorkingDir": "/"},
            "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{diff_id}")]},
        });
        let config = serde_json::to_vec(&config).expect("config serializes");
        let config_name = format!("{}.json", hex(&Sha256::digest(&config)));
        let manifest = serde_json::json!([{
            "Config": config_name, "RepoTags": [self.name], "Layers": [format!("{diff_id}/layer.tar")],
        }]);
        let tmp = out.with_extension("tmp");
        let file = std::fs::File::create(&tmp).map_err(io_err(format!("creating {}", tmp.display())))?;
        let mut tar = tar::Builder::new(file);
        let what = format!("writing {}", tmp.display());
        let w = |source| Error::Io { what: what.clone(), source };
        append_bytes(&mut tar, &config_name, &config, 0o644).map_err(&w)?;
        append_bytes(&mut tar, "manifest.json", &serde_json::to_vec(&manifest).expect("json"), 0o644).map_err(&w)?;
        let mut layer = std::fs::File::open(&layer_path).map_err(&w)?;
        let mut header = tar::Header::new_gnu();
        header.set_size(layer.metadata().map_err(&w)?.len());
        header.set_mode(0o644);
        tar.append_data(&mut header, format!("{diff_id}/layer.tar"), &mut layer).map_err(&w)?;
        tar.into_inner().and_then(|mut f| f.flush()).map_err(&w)?;
        std::fs::remove_file(&layer_path).map_err(&w)?;
        std::fs::rename(&tmp, &out).map_err(io_err(format!("renaming {}", tmp.display())))?;
        // Older tarballs of the same image (a rebuilt vkube is a new one of a few hundred MB).
        let prefix = format!("{}-", sanitize(&self.name));
        for e in std::fs::read_dir(cache).into_iter().flatten().filter_map(|e| e.ok()) {
            let file = e.file_name().to_string_lossy().into_owned();
            if file.starts_with(&prefix) && file.ends_with(".tar") && e.path() != out {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(out)
    }

    fn write_layer(&self, out: &mut impl Write) -> Result<()> {
        let mut tar = tar::Builder::new(out);
        tar.mode(tar::HeaderMode::Deterministic);
        let w = |source| Error::Io { what: "writing an image layer".into(), source };
        // Parents first, each once: a layer is applied in order.
        let mut dirs: Vec<String> = self.dirs.clone();
        let all_paths = self.files.iter().map(|(p, _)| p).chain(self.texts.iter().map(|(p, _)| p));
        for p in all_paths.chain(self.symlinks.iter().map(|(l, _)| l)) {
            let mut parent = Path::new(p.trim_start_matches('/')).parent();
            while let Some(d) = parent.filter(|d| !d.as_os_str().is_empty()) {
                dirs.push(format!("/{}", d.display()));
                parent = d.parent();
            }
        }
        dirs.sort();
        dirs.dedup();
        for d in &dirs {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(if d == "/tmp" { 0o1777 } else { 0o755 });
            h.set_size(0);
            tar.append_data(&mut h, format!("{}/", d.trim_start_matches('/')), std::io::empty()).map_err(&w)?;
        }
        for (path, src) in &self.files {
            let mut f = std::fs::File::open(src).map_err(io_err(format!("reading {}", src.display())))?;
            let meta = f.metadata().map_err(io_err(format!("reading {}", src.display())))?;
            let mut h = tar::Header::new_gnu();
            h.set_size(meta.len());
            h.set_mode(if std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o111 != 0 {
                0o755
            } else {
                0o644
            });
            tar.append_data(&mut h, path.trim_start_matches('/'), &mut f as &mut dyn Read).map_err(&w)?;
        }
        for (path, text) in &self.texts {
            append_bytes(&mut tar, path.trim_start_matches('/'), text.as_bytes(), 0o644).map_err(&w)?;
        }
        for (link, target) in &self.symlinks {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_mode(0o777);
            h.set_size(0);
            tar.append_link(&mut h, link.trim_start_matches('/'), target).map_err(&w)?;
        }
        tar.into_inner().map_err(&w)?.flush().map_err(&w)?;
        Ok(())
    }
}

fn append_bytes<W: Write>(tar: &mut tar::Builder<W>, path: &str, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_size(bytes.len() as u64);
    h.set_mode(mode);
    tar.append_data(&mut h, path, bytes)
}

struct Hashing<W> {
    inner: W,
    hash: Sha256,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sanitize(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '_' }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tarball_has_a_manifest_a_config_and_a_layer_whose_digest_the_config_names() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("hello");
        std::fs::write(&bin, b"#!/bin/sh\necho hi\n").unwrap();
        std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let mut spec = ImageSpec::new("example.test/hello:1");
        spec.files.push(("/bin/hello".into(), bin));
        spec.symlinks.push(("/bin/hi".into(), "hello".into()));
        spec.dirs.push("/tmp".into());
        spec.entrypoint = vec!["/bin/hello".into()];
        let path = spec.build(&dir.path().join("cache")).unwrap();
        // Unchanged inputs: the same file, not written again.
        assert_eq!(spec.build(&dir.path().join("cache")).unwrap(), path);
        // Changed inputs: a new file, and the old one goes.
        let mut changed = spec.clone();
        changed.cmd = vec!["again".into()];
        let newer = changed.build(&dir.path().join("cache")).unwrap();
        assert_ne!(newer, path);
        assert!(newer.exists() && !path.exists());
        let path = spec.build(&dir.path().join("cache")).unwrap();

        let mut archive = tar::Archive::new(std::fs::File::open(&path).unwrap());
        let mut files = std::collections::BTreeMap::new();
        for e in archive.entries().unwrap() {
            let mut e = e.unwrap();
            let mut buf = vec![];
            e.read_to_end(&mut buf).unwrap();
            files.insert(e.path().unwrap().display().to_string(), buf);
        }
        let manifest: serde_json::Value = serde_json::from_slice(&files["manifest.json"]).unwrap();
        assert_eq!(manifest[0]["RepoTags"][0], "example.test/hello:1");
        let config: serde_json::Value =
            serde_json::from_slice(&files[manifest[0]["Config"].as_str().unwrap()]).unwrap();
        let layer = &files[manifest[0]["Layers"][0].as_str().unwrap()];
        assert_eq!(config["rootfs"]["diff_ids"][0], format!("sha256:{}", hex(&Sha256::digest(layer))));
        assert_eq!(config["config"]["Entrypoint"][0], "/bin/hello");
        let mut inner = tar::Archive::new(&layer[..]);
        let names: Vec<String> =
            inner.entries().unwrap().map(|e| e.unwrap().path().unwrap().display().to_string()).collect();
        assert_eq!(names, vec!["bin/", "tmp/", "bin/hello", "bin/hi"]);
    }
}
