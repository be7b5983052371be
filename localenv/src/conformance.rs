//! The upstream conformance suite's pieces: `e2e.test`, `ginkgo` and `agnhost`, built by
//! `hack/build-upstream.sh conformance` from the pinned Kubernetes module, and the images the
//! suite names, made from local files (no registry) for the real node.
//!
//! Most specs run agnhost, the suite's test binary; it is built from the module and put in an
//! image with busybox's tools (its shell commands). The web servers some specs only need to
//! serve on port 80 (nginx, kitten, nautilus) are agnhost's `test-webserver`, as kitten and
//! nautilus are upstream; glibc-dns-testing is the busybox image, whose `dig` and `getent` are
//! Debian's, linked with glibc. What cannot be made from local files is reported, not faked.

use std::path::{Path, PathBuf};

use crate::image::ImageSpec;
use crate::node::{busybox_image, pause_image, shared_libraries};
use crate::upstream::{Upstream, cache_root, versions};
use crate::{Error, Result};

/// Where the built suite lives (a cache directory keyed by the Kubernetes version).
pub fn dir() -> PathBuf {
    cache_root().join("upstream").join(format!("conformance-{}", versions().kubernetes))
}

/// `e2e.test`, `ginkgo` and `agnhost`, or how to build them.
pub fn binaries() -> Result<(PathBuf, PathBuf, PathBuf)> {
    let d = dir();
    let bins = (d.join("e2e.test"), d.join("ginkgo"), d.join("agnhost"));
    for b in [&bins.0, &bins.1, &bins.2, &d.join("localhost.crt"), &d.join("localhost.key")] {
        if !b.is_file() {
            return Err(Error::Node(format!("{} is missing: run `hack/build-upstream.sh conformance`", b.display())));
        }
    }
    Ok(bins)
}

/// The stand-in for an image the suite names, by its repository's last part; None when it is
/// not one of those made here.
fn stand_in(up: &Upstream, name: &str, agnhost: &Path) -> Result<Option<ImageSpec>> {
    // Only the public registry's names: specs that name a private or an invalid registry expect
    // the pull to fail.
    if !name.starts_with("registry.k8s.io/") {
        return Ok(None);
    }
    let repo = name.rsplit_once(':').map_or(name, |(r, _)| r);
    let last = repo.rsplit('/').next().unwrap_or(repo);
    let agnhost_image = |cmd: &str| -> Result<ImageSpec> {
        // As upstream's Dockerfile: agnhost at / (and as agnhost-2), busybox's tools for the
        // commands specs run in it, an upload directory, and the user and group it defines.
        let mut image = shell_image(name)?;
        image.files.push(("/agnhost".into(), agnhost.to_path_buf()));
        image.symlinks.push(("/agnhost-2".into(), "agnhost".into()));
        image.dirs.push("/uploads".into());
        for file in ["localhost.crt", "localhost.key"] {
            image.files.push((format!("/{file}"), dir().join(file)));
        }
        image.texts.retain(|(path, _)| path != "/etc/passwd" && path != "/etc/group");
        image.texts.push((
            "/etc/passwd".into(),
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n\
             user-defined-in-image:x:1000:1000::/home/user-defined-in-image:/bin/sh\n"
                .into(),
        ));
        image.texts.push((
            "/etc/group".into(),
            "root:x:0:\nnogroup:x:65534:\nuser-defined-in-image:x:1000:\ngroup-defined-in-image:x:50000:user-defined-in-image\n"
                .into(),
        ));
        image.entrypoint = vec!["/agnhost".into()];
        image.cmd = vec![cmd.into()];
        Ok(image)
    };
    Ok(match last {
        "agnhost" => Some(agnhost_image("pause")?),
        "kitten" | "nautilus" | "nginx" => Some(agnhost_image("test-webserver")?),
        "busybox" | "glibc-dns-testing" => Some(shell_image(name)?),
        "pause" => Some(pause_image(up, name)),
        _ => None,
    })
}

/// The Debian packages the images take files from (`hack/conformance` installs them).
pub const DEBIAN_PACKAGES: [&str; 2] = ["bash-static", "bind9-dnsutils"];

/// busybox with bash as `sh` (busybox 1.35's shell, Debian's, drops environment variables whose
/// names are no shell identifiers, such as `data-1`, which specs set and read back with
/// `sh -c env`), and the DNS specs' probes: `dig` (with the libraries it links) and glibc's
/// `getent`, as upstream's agnhost and glibc-dns-testing images have.
fn shell_image(name: &str) -> Result<ImageSpec> {
    let missing = || Error::Node(format!("run `hack/debian-deps.sh {}`", DEBIAN_PACKAGES.join(" ")));
    let bash = PathBuf::from("/bin/bash-static");
    let (dig, getent) = (PathBuf::from("/usr/bin/dig"), PathBuf::from("/usr/bin/getent"));
    if !bash.is_file() || !dig.is_file() || !getent.is_file() {
        return Err(missing());
    }
    let mut image = busybox_image(name)?;
    image.symlinks.retain(|(link, _)| link != "/bin/sh");
    image.files.push(("/bin/bash".into(), bash));
    image.symlinks.push(("/bin/sh".into(), "bash".into()));
    for tool in [&dig, &getent] {
        image.files.push((tool.display().to_string(), tool.clone()));
        for lib in shared_libraries(tool)? {
            if !image.files.iter().any(|(path, _)| *path == lib.display().to_string()) {
                image.files.push((lib.display().to_string(), lib));
            }
        }
    }
    Ok(image)
}

/// The images of `names` (as `e2e.test --list-images` prints them) that can be made here, and
/// the names that cannot.
pub fn images(up: &Upstream, names: &[String]) -> Result<(Vec<ImageSpec>, Vec<String>)> {
    let (_, _, agnhost) = binaries()?;
    let (mut made, mut missing) = (vec![], vec![]);
    for name in names {
        match stand_in(up, name, &agnhost)? {
            Some(image) => made.push(image),
            None => missing.push(name.clone()),
        }
    }
    Ok((made, missing))
}
