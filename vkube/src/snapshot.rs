//! A virtual cluster's snapshot file (`vkube snapshot`, `vkube restore`, `vkube create
//! --from-snapshot`): a gzip-compressed tar archive whose first entry, `manifest.json`, says what
//! it is (format, cluster, versions, time) and the size and SHA-256 of every other entry: etcd's
//! snapshot (`etcd.db`) and, only when asked for, the cluster's certificates and keys
//! (`pki/NAME`). Written and read as streams: never held whole in memory.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The newest format this vkube writes and reads.
pub const FORMAT: u32 = 1;
pub const MANIFEST: &str = "manifest.json";
pub const ETCD_DB: &str = "etcd.db";
pub const PKI_PREFIX: &str = "pki/";

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub format: u32,
    pub cluster: String,
    pub namespace: String,
    /// RFC 3339.
    pub created: String,
    pub vkube_version: String,
    pub kubernetes_version: String,
    pub etcd_version: String,
    pub parts: Vec<Part>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

/// Where a part's bytes come from.
pub enum Source {
    File(PathBuf),
    Bytes(Vec<u8>),
}

impl Manifest {
    /// A manifest of this vkube and its pinned upstream versions, without parts yet.
    pub fn new(cluster: &str, namespace: &str) -> Self {
        let v = vkube_core::versions::versions();
        Manifest {
            format: FORMAT,
            cluster: cluster.into(),
            namespace: namespace.into(),
            created: jiff::Timestamp::now().to_string(),
            vkube_version: env!("CARGO_PKG_VERSION").into(),
            kubernetes_version: v.kubernetes,
            etcd_version: v.etcd,
            parts: vec![],
        }
    }

    pub fn has_pki(&self) -> bool {
        self.parts.iter().any(|p| p.name.starts_with(PKI_PREFIX))
    }

    /// Whether this snapshot may become the state of `cluster`: its own (a restore), or any
    /// cluster's when forking (a new cluster from it). Never one from a newer Kubernetes, whose
    /// objects an older API server may not read.
    pub fn check_for(&self, cluster: &str, fork: bool) -> anyhow::Result<()> {
        if !fork && self.cluster != cluster {
            bail!(
                "this snapshot is of virtual cluster {:?}, not {cluster:?}: restore it into {:?}, or make a new cluster from it with `vkube create NEW --from-snapshot FILE`",
                self.cluster,
                self.cluster
            );
        }
        let ours = vkube_core::versions::versions().kubernetes;
        if minor(&self.kubernetes_version) > minor(&ours) {
            bail!(
                "this snapshot was taken with Kubernetes {}, newer than this cluster's {ours}: restore it with a vkube of that version",
                self.kubernetes_version
            );
        }
        Ok(())
    }
}

/// `v1.37.2` → (1, 37); unparsable versions sort first.
fn minor(version: &str) -> (u32, u32) {
    let mut it = version.trim_start_matches('v').split('.').map(|n| n.parse().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

/// Writes the archive: the manifest (with every part's size and checksum, filled in here) first,
/// then the parts in order. Files are read twice (checksum, then copy), never held in memory.
pub fn write(out: impl Write, mut manifest: Manifest, parts: Vec<(String, Source)>) -> anyhow::Result<Manifest> {
    manifest.parts = parts
        .iter()
        .map(|(name, source)| {
            let (size, sha256) = match source {
                Source::File(path) => {
                    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
                    hash_copy(file, std::io::sink())?
                }
                Source::Bytes(b) => hash_copy(b.as_slice(), std::io::sink())?,
            };
            anyhow::Ok(Part { name: name.clone(), size, sha256 })
        })
        .collect::<anyhow::Result<_>>()?;
    let gz = flate2::write::GzEncoder::new(out, flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    let header = |size: u64| {
        let mut h = tar::Header::new_gnu();
        h.set_size(size);
        h.set_mode(0o600);
        h.set_mtime(jiff::Timestamp::now().as_second().max(0) as u64);
        h
    };
    let json = serde_json::to_vec_pretty(&manifest)?;
    tar.append_data(&mut header(json.len() as u64), MANIFEST, json.as_slice())?;
    for ((name, source), part) in parts.into_iter().zip(&manifest.parts) {
        match source {
            Source::File(path) => {
                let file = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
                tar.append_data(&mut header(part.size), &name, file.take(part.size))?;
            }
            Source::Bytes(b) => tar.append_data(&mut header(part.size), &name, b.as_slice())?,
        }
    }
    tar.into_inner()?.finish()?.flush()?;
    Ok(manifest)
}

/// Reads an archive into `dir` (`etcd.db`, `pki/NAME`), checking every part against the
/// manifest: a part it does not list, a size or checksum that differs, or a listed part missing
/// is an error (the file is damaged or not ours). Returns the manifest.
pub fn read(input: impl Read, dir: &Path) -> anyhow::Result<Manifest> {
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(input));
    let mut entries = archive.entries().context("not a vkube snapshot (not a gzip-compressed tar archive)")?;
    let manifest = manifest_of(&mut entries)?;
    let mut seen = Vec::new();
    for entry in entries {
        let entry = entry.context("the snapshot is damaged (reading the archive)")?;
        let name = entry.path()?.display().to_string();
        let part = manifest
            .parts
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| anyhow::anyhow!("the snapshot has an entry its manifest does not list: {name:?}"))?;
        let target = dir.join(part_path(&name)?);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&target)
            .with_context(|| format!("writing {}", target.display()))?;
        // The header and the manifest must agree, and neither may claim more than a part can
        // hold: a small file must not unpack into a full disk.
        if entry.header().size()? != part.size || part.size > max_size(&name) {
            bail!("the snapshot is damaged or forged: {name} is larger than its manifest or vkube allows");
        }
        let (size, sha256) = hash_copy(entry.take(part.size), file)?;
        if size != part.size || sha256 != part.sha256 {
            bail!("the snapshot is damaged: {name} does not match its checksum in the manifest");
        }
        seen.push(name);
    }
    if let Some(missing) = manifest.parts.iter().find(|p| !seen.contains(&p.name)) {
        bail!("the snapshot is incomplete: it has no {} (listed in its manifest)", missing.name);
    }
    if !seen.iter().any(|n| n == ETCD_DB) {
        bail!("the snapshot has no {ETCD_DB}");
    }
    Ok(manifest)
}

/// The manifest alone (the archive's first entry), without reading the parts.
pub fn read_manifest(input: impl Read) -> anyhow::Result<Manifest> {
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(input));
    let mut entries = archive.entries().context("not a vkube snapshot (not a gzip-compressed tar archive)")?;
    manifest_of(&mut entries)
}

fn manifest_of<R: Read>(entries: &mut tar::Entries<'_, R>) -> anyhow::Result<Manifest> {
    let mut first = entries
        .next()
        .ok_or_else(|| anyhow::anyhow!("not a vkube snapshot: the archive is empty"))?
        .context("not a vkube snapshot (not a gzip-compressed tar archive)")?;
    let name = first.path()?.display().to_string();
    if name != MANIFEST {
        bail!("not a vkube snapshot: its first entry is {name:?}, not {MANIFEST}");
    }
    let mut json = Vec::new();
    (&mut first).take(1 << 20).read_to_end(&mut json)?;
    let manifest: Manifest =
        serde_json::from_slice(&json).context("not a vkube snapshot: its manifest is unreadable")?;
    if manifest.format > FORMAT {
        bail!(
            "this snapshot has format {}, newer than this vkube reads ({FORMAT}): use a newer vkube",
            manifest.format
        );
    }
    Ok(manifest)
}

/// The most a part may hold: etcd's data within twice its backend quota (2 GiB), a PEM file a
/// few KiB.
fn max_size(name: &str) -> u64 {
    if name == ETCD_DB { 4 << 30 } else { 64 << 10 }
}

/// The relative path a part is written to: `etcd.db` or `pki/NAME` with a plain file name.
fn part_path(name: &str) -> anyhow::Result<PathBuf> {
    let plain = |n: &str| !n.is_empty() && n != "." && n != ".." && !n.contains(['/', '\\', '\0']);
    match name.strip_prefix(PKI_PREFIX) {
        None if name == ETCD_DB => Ok(PathBuf::from(name)),
        Some(file) if plain(file) => Ok(PathBuf::from(name)),
        _ => bail!("the snapshot has an entry vkube does not write: {name:?}"),
    }
}

/// Copies everything, returning the size and the hex SHA-256 of what was copied.
fn hash_copy(mut from: impl Read, mut to: impl Write) -> std::io::Result<(u64, String)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut size = 0u64;
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        to.write_all(&buf[..n])?;
        size += n as u64;
    }
    to.flush()?;
    Ok((size, hex(&hasher.finalize())))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(parts: Vec<(String, Source)>) -> (Vec<u8>, Manifest) {
        let mut out = Vec::new();
        let m = write(&mut out, Manifest::new("team-a", "vkube-team-a"), parts).unwrap();
        (out, m)
    }

    #[test]
    fn round_trip_checks_every_part() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db");
        std::fs::write(&db, vec![7u8; 200_000]).unwrap();
        let (bytes, written) =
            archive(vec![(ETCD_DB.into(), Source::File(db)), ("pki/ca.key".into(), Source::Bytes(b"KEY".to_vec()))]);
        let out = tempfile::tempdir().unwrap();
        let read_back = read(bytes.as_slice(), out.path()).unwrap();
        assert_eq!(read_back, written);
        assert_eq!(read_manifest(bytes.as_slice()).unwrap(), written);
        assert!(read_back.has_pki());
        assert_eq!(std::fs::read(out.path().join("etcd.db")).unwrap(), vec![7u8; 200_000]);
        assert_eq!(std::fs::read(out.path().join("pki/ca.key")).unwrap(), b"KEY");
        assert_eq!(written.parts[0].size, 200_000);
    }

    /// An archive with this manifest and these entries, whatever they hold.
    fn raw_archive(manifest: &Manifest, entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(&mut out, flate2::Compression::fast()));
        let json = serde_json::to_vec(manifest).unwrap();
        for (name, bytes) in std::iter::once((MANIFEST, json.as_slice())).chain(entries.iter().copied()) {
            let mut h = tar::Header::new_gnu();
            h.set_size(bytes.len() as u64);
            tar.append_data(&mut h, name, bytes).unwrap();
        }
        tar.into_inner().unwrap().finish().unwrap();
        out
    }

    #[test]
    fn damaged_or_foreign_archives_are_refused() {
        let parts = || vec![(ETCD_DB.to_string(), Source::Bytes(b"etcd data".to_vec()))];
        let (good, manifest) = archive(parts());
        // A part whose bytes differ from the manifest's checksum.
        let tampered = raw_archive(&manifest, &[(ETCD_DB, b"ETCD DATA")]);
        let err = |bytes: &[u8]| read(bytes, tempfile::tempdir().unwrap().path()).unwrap_err().to_string();
        assert!(err(&tampered).contains("does not match its checksum"), "{}", err(&tampered));
        assert!(read(&good[..good.len() / 2], tempfile::tempdir().unwrap().path()).is_err(), "a cut-off file");
        assert!(err(b"plain text").contains("not a vkube snapshot"));
        let future = raw_archive(&Manifest { format: FORMAT + 1, ..manifest.clone() }, &[]);
        assert!(err(&future).contains("newer than this vkube reads"), "{}", err(&future));
        // More bytes than the manifest says (a small file that would unpack into a full disk).
        let bomb = raw_archive(&manifest, &[(ETCD_DB, &[0u8; 4096])]);
        assert!(err(&bomb).contains("larger than its manifest"), "{}", err(&bomb));
        let big_key = vec![b'k'; 100 << 10];
        let mut forged = manifest.clone();
        forged.parts.push(Part { name: "pki/ca.key".into(), size: big_key.len() as u64, sha256: String::new() });
        let forged = raw_archive(&forged, &[(ETCD_DB, b"etcd data"), ("pki/ca.key", &big_key)]);
        assert!(err(&forged).contains("larger than its manifest or vkube allows"), "{}", err(&forged));
        let extra = raw_archive(&manifest, &[(ETCD_DB, b"etcd data"), ("pki/extra.key", b"x")]);
        assert!(err(&extra).contains("does not list"), "{}", err(&extra));
        assert!(part_path("pki/../../etc/passwd").is_err() && part_path("other").is_err());
    }

    #[test]
    fn only_its_own_cluster_unless_forked() {
        let m = Manifest::new("team-a", "vkube-team-a");
        assert!(m.check_for("team-a", false).is_ok());
        let e = m.check_for("team-b", false).unwrap_err().to_string();
        assert!(e.contains("not \"team-b\"") && e.contains("--from-snapshot"), "{e}");
        assert!(m.check_for("team-b", true).is_ok());
        let newer = Manifest { kubernetes_version: "v1.99.0".into(), ..m };
        assert!(newer.check_for("team-a", false).unwrap_err().to_string().contains("newer"));
    }
}
