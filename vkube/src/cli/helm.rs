//! Helm, for installing the chart on a real host: the pinned binary from the cache when there,
//! else `helm` on PATH. The chart is built into this binary, so `vkube` works from anywhere.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;
use include_dir::{Dir, include_dir};

static CHART: Dir<'_> = include_dir!("$CARGO_MANIFEST_DIR/../charts/vkube");

fn binary() -> PathBuf {
    vkube_localenv::Upstream::locate().map(|u| u.helm()).unwrap_or_else(|_| PathBuf::from("helm"))
}

/// Whether there is a Helm to run (none in the platform's image: it deletes without it).
pub fn available() -> bool {
    let b = binary();
    if b.components().count() > 1 {
        return b.is_file();
    }
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(&b).is_file()))
}

/// Runs helm with `args`; a failure carries helm's message.
pub fn run(args: &[&str]) -> anyhow::Result<()> {
    output(args).map(drop)
}

/// Runs helm with `args` and returns what it printed.
pub fn output(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(binary())
        .args(args)
        .output()
        .context("running helm (install Helm 3, or run hack/build-upstream.sh for the pinned one)")?;
    if !out.status.success() {
        anyhow::bail!("helm {} failed: {}", args.first().unwrap_or(&""), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The built-in chart, written to a temporary directory for helm to read.
pub fn chart() -> anyhow::Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new().prefix("vkube-chart-").tempdir()?;
    CHART.extract(dir.path()).context("writing the built-in chart")?;
    Ok(dir)
}

/// `--values=FILE` and `--set=KEY=VALUE` flags for helm.
pub fn value_args(files: &[impl AsRef<Path>], sets: &[String]) -> Vec<String> {
    let files = files.iter().map(|f| format!("--values={}", f.as_ref().display()));
    files.chain(sets.iter().map(|s| format!("--set={s}"))).collect()
}
