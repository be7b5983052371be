//! `hack/conformance`: the upstream Kubernetes conformance suite (`e2e.test` of the pinned
//! version) against the dev host itself and against a virtual cluster on it, side by side in one
//! run, on a host with a real node. Writes each side's junit and JSON reports and a summary
//! (`summary.json`, `summary.md`): passed, failed and skipped per side, and the specs that pass on
//! the host but not on the virtual cluster, each with its failure message.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use serde_json::{Value, json};
use vkube_e2e::TestEnv;
use vkube_localenv::{HostOptions, Upstream, conformance};

/// The conformance suite against the host and a virtual cluster, side by side.
#[derive(Parser, Debug)]
#[command(name = "hack/conformance")]
struct Args {
    /// The specs to run: a regular expression over the full spec text.
    #[arg(long, default_value = r"\[Conformance\]")]
    focus: String,
    /// Specs to leave out (a regular expression).
    #[arg(long)]
    skip: Option<String>,
    /// Only the host side.
    #[arg(long, conflicts_with = "virtual_name")]
    host: bool,
    /// Only the virtual side, a cluster of this name.
    #[arg(long = "virtual", value_name = "NAME")]
    virtual_name: Option<String>,
    /// Run the host side first and the virtual side after it, not both at once.
    #[arg(long)]
    one_at_a_time: bool,
    /// Specs run at once per side (ginkgo processes); [Serial] specs run alone at the end.
    #[arg(long, default_value_t = 4)]
    procs: usize,
    /// Extra `vkube run` flags for the virtual cluster (not the policy's, below), repeatable.
    #[arg(long = "run-arg", value_name = "FLAG")]
    run_args: Vec<String>,
    /// The virtual cluster's isolation policy, as `vkube run` takes it (e.g. --pod-security
    /// privileged, --allow-node-ports): to show which specs a documented setting lets pass.
    #[command(flatten)]
    policy: vkube::controlplane::PolicyArgs,
    /// Where the reports go.
    #[arg(long, default_value = "target/conformance")]
    out: PathBuf,
    /// A side is stopped after this long (ginkgo's --timeout).
    #[arg(long, default_value = "6h")]
    timeout: String,
}

/// One spec's outcome on one side.
#[derive(Clone, Debug)]
struct Outcome {
    state: String,
    seconds: f64,
    failure: Option<String>,
}

struct Side {
    name: String,
    seconds: f64,
    specs: BTreeMap<String, Outcome>,
    /// Failures outside specs (suite setup), which skip every spec after them.
    suite_failures: Vec<String>,
}

impl Side {
    fn count(&self, state: &str) -> usize {
        self.specs.values().filter(|o| o.state == state).count()
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let up = Upstream::locate()?;
    let (e2e_test, ginkgo, _) = conformance::binaries()?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let out = args.out.canonicalize()?;
    let started = Instant::now();

    let listed = Command::new(&e2e_test).arg("--list-images").output().context("running e2e.test --list-images")?;
    anyhow::ensure!(
        listed.status.success(),
        "e2e.test --list-images failed: {} (rebuild it: hack/build-upstream.sh conformance)",
        String::from_utf8_lossy(&listed.stderr).trim()
    );
    let names: Vec<String> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    let (images, not_made) = conformance::images(&up, &names)?;

    // One listener for the whole run. A first Ctrl-C (or SIGTERM) stops the run at the next step
    // and tears the host down (mounts, the bridge, the node's processes); one while the host
    // starts is acted on once the start is over. A second one exits at once.
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        interrupted().await;
        eprintln!("[conformance] interrupted: stopping and tearing the host down (again to exit at once, leaving it)");
        let _ = stop_tx.send(true);
        interrupted().await;
        std::process::exit(130);
    });
    let stopped = || {
        if *stop.borrow() {
            anyhow::bail!("interrupted while starting: the host is torn down");
        }
        Ok(())
    };
    eprintln!("[conformance] starting a dev host with a real node");
    let env = TestEnv::start_with(HostOptions { nodes: 0, real_nodes: 1, ..Default::default() }).await;
    stopped()?;
    eprintln!(
        "[conformance] importing {} images ({} named by the suite are not made here)",
        images.len(),
        not_made.len()
    );
    env.host.import_images(&images)?;
    stopped()?;

    let vc = match (args.host, &args.virtual_name) {
        (true, _) => None,
        (false, name) => {
            let name = name.clone().unwrap_or_else(|| "conformance".into());
            // The suite waits for schedulable nodes before its first spec: show the host's from
            // the start, not only once a pod runs on one.
            let mut run_args: Vec<&str> = vec!["--sync-all-nodes"];
            run_args.extend(args.run_args.iter().map(String::as_str));
            eprintln!(
                "[conformance] starting virtual cluster {name} ({}, policy {:?})",
                run_args.join(" "),
                args.policy
            );
            Some(env.virtual_cluster_with_policy(&name, args.policy.clone(), &run_args).await)
        }
    };
    stopped()?;
    let host_side = async {
        match args.virtual_name {
            None => Some(run_side(&args, &out, "host", &env.host.kubeconfig, &e2e_test, &ginkgo, stop.clone()).await)
                .transpose(),
            Some(_) => Ok(None),
        }
    };
    let virtual_side = async {
        match &vc {
            Some(vc) => {
                let side = format!("virtual-{}", vc.name());
                Some(run_side(&args, &out, &side, &vc.kubeconfig(), &e2e_test, &ginkgo, stop.clone()).await).transpose()
            }
            None => Ok(None),
        }
    };
    // Side by side unless asked otherwise: most specs wait rather than compute, and both sides
    // then see the same machine at the same time.
    let (host_side, virtual_side) = if args.one_at_a_time {
        // An interrupted host side stops the run before the virtual side starts.
        let h = Ok(host_side.await?);
        (h, virtual_side.await)
    } else {
        tokio::join!(host_side, virtual_side)
    };
    let sides: Vec<Side> = [host_side?, virtual_side?].into_iter().flatten().collect();

    let summary = summarize(&args, &sides, &not_made, started.elapsed());
    std::fs::write(out.join("summary.json"), serde_json::to_string_pretty(&summary)?)?;
    let md = markdown(&summary);
    std::fs::write(out.join("summary.md"), &md)?;
    println!("{md}");
    eprintln!("[conformance] reports in {}", out.display());
    Ok(())
}

/// Runs the suite against one cluster; its reports go to `out/side`.
async fn run_side(
    args: &Args,
    out: &Path,
    side: &str,
    kubeconfig: &Path,
    e2e_test: &Path,
    ginkgo: &Path,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Side> {
    let dir = out.join(side);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let log_path = dir.join("ginkgo.log");
    let log = std::fs::File::create(&log_path)?;
    let mut cmd = Command::new(ginkgo);
    cmd.arg(format!("--procs={}", args.procs))
        .arg(format!("--focus={}", args.focus))
        .arg(format!("--timeout={}", args.timeout))
        .args(["--no-color", "--junit-report=junit.xml", "--json-report=report.json"])
        .arg(format!("--output-dir={}", dir.display()));
    if let Some(skip) = &args.skip {
        cmd.arg(format!("--skip={skip}"));
    }
    cmd.arg(e2e_test).arg("--").arg(format!("--kubeconfig={}", kubeconfig.display())).args([
        "--provider=skeleton",
        // Images are imported into the node, never pulled: nothing to pre-pull or check.
        "--prepull-images=false",
    ]);
    cmd.arg(format!("--report-dir={}", dir.display()));
    let started = Instant::now();
    eprintln!("[conformance] {side}: running (log: {})", log_path.display());
    // Its own process group, so an interrupted run stops ginkgo's e2e.test processes too; the
    // host (and its real node) is then torn down as the runner returns.
    let mut child = cmd
        .stdout(log.try_clone()?)
        .stderr(log)
        .stdin(Stdio::null())
        .process_group(0)
        .spawn()
        .context("starting ginkgo")?;
    let mut last_note = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            eprintln!("[conformance] {side}: ginkgo exited with {status} after {}", minutes(started.elapsed()));
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = stop.wait_for(|stopped| *stopped) => {
                let _ = Command::new("kill").args(["-TERM", "--", &format!("-{}", child.id())]).status();
                let _ = child.wait();
                anyhow::bail!("interrupted: the {side} side stopped, the host is torn down");
            }
        }
        if last_note.elapsed() >= Duration::from_secs(60) {
            last_note = Instant::now();
            let ran = std::fs::read_to_string(&log_path).map(|l| l.matches('•').count()).unwrap_or(0);
            eprintln!("[conformance] {side}: {} so far, about {ran} specs finished", minutes(started.elapsed()));
        }
    }
    let report = dir.join("report.json");
    let text = std::fs::read_to_string(&report)
        .with_context(|| format!("{} is missing: see {}", report.display(), log_path.display()))?;
    let mut parsed = parse_report(&serde_json::from_str(&text)?);
    parsed.name = side.to_string();
    parsed.seconds = started.elapsed().as_secs_f64();
    Ok(parsed)
}

/// Ginkgo's JSON report: suites, each with its spec reports.
fn parse_report(report: &Value) -> Side {
    let mut side = Side { name: String::new(), seconds: 0.0, specs: BTreeMap::new(), suite_failures: vec![] };
    for suite in report.as_array().into_iter().flatten() {
        for spec in suite["SpecReports"].as_array().into_iter().flatten() {
            let state = spec["State"].as_str().unwrap_or("unknown").to_string();
            let failure = spec["Failure"]["Message"].as_str().map(|m| m.trim().to_string()).filter(|m| !m.is_empty());
            // Specs the focus left out are "skipped" without a reason; those skipped while
            // running (a missing feature) say why.
            if state == "skipped" && failure.is_none() {
                continue;
            }
            if spec["LeafNodeType"].as_str() != Some("It") {
                if let (true, Some(f)) = (state != "passed", failure) {
                    side.suite_failures.push(format!("{}: {f}", spec["LeafNodeType"].as_str().unwrap_or("?")));
                }
                continue;
            }
            let mut text: Vec<&str> =
                spec["ContainerHierarchyTexts"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
            text.push(spec["LeafNodeText"].as_str().unwrap_or_default());
            let seconds = spec["RunTime"].as_f64().unwrap_or(0.0) / 1e9;
            side.specs.insert(text.join(" "), Outcome { state, seconds, failure });
        }
    }
    side
}

fn summarize(args: &Args, sides: &[Side], not_made: &[String], took: Duration) -> Value {
    let per_side: Vec<Value> = sides
        .iter()
        .map(|s| {
            json!({
                "side": s.name, "passed": s.count("passed"), "failed": s.count("failed"),
                "skipped": s.count("skipped"), "other": s.specs.len() - s.count("passed") - s.count("failed") - s.count("skipped"),
                "seconds": s.seconds.round(), "suite_failures": s.suite_failures,
            })
        })
        .collect();
    let (mut only_host, mut only_virtual, mut not_reached) = (vec![], vec![], vec![]);
    let mut compared = (0usize, 0usize, 0usize);
    if let [host, virt] = sides {
        for (spec, h) in &host.specs {
            let Some(v) = virt.specs.get(spec) else {
                // Not reached on the virtual side (its timeout): no comparison, only a count.
                not_reached.push(spec.clone());
                continue;
            };
            compared.0 += 1;
            compared.1 += usize::from(h.state == "passed");
            compared.2 += usize::from(v.state == "passed");
            if h.state == "passed" && v.state != "passed" {
                only_host.push(json!({
                    "spec": spec,
                    "virtual_state": v.state,
                    "message": v.failure.clone().map(|m| shorten(&m, 600)),
                    "host_seconds": h.seconds.round(),
                }));
            } else if h.state == "failed" && v.state == "passed" {
                only_virtual.push(json!({"spec": spec, "message": h.failure.clone().map(|m| shorten(&m, 600))}));
            }
        }
    }
    // Over the specs both sides ran: a side stopped by its timeout is not counted as failing.
    let ratio = (compared.1 > 0).then(|| compared.2 as f64 / compared.1 as f64);
    json!({
        "kubernetes": vkube_localenv::upstream::versions().kubernetes,
        "focus": args.focus, "skip": args.skip, "procs": args.procs, "run_args": args.run_args,
        "policy": format!("{:?}", args.policy),
        "minutes": (took.as_secs_f64() / 60.0 * 10.0).round() / 10.0,
        "sides": per_side, "ratio_passed_virtual_to_host": ratio,
        "compared": {"specs": compared.0, "passed_host": compared.1, "passed_virtual": compared.2},
        "not_reached_on_virtual": not_reached,
        "pass_on_host_not_on_virtual": only_host, "pass_on_virtual_not_on_host": only_virtual,
        "images_not_made": not_made,
    })
}

fn markdown(s: &Value) -> String {
    let mut md = format!(
        "# Conformance run\n\nKubernetes {}, focus `{}`, skip `{}`, {} processes per side, {} minutes.\n\n",
        s["kubernetes"].as_str().unwrap_or("?"),
        s["focus"].as_str().unwrap_or_default(),
        s["skip"].as_str().unwrap_or("-"),
        s["procs"],
        s["minutes"],
    );
    md.push_str("| side | passed | failed | skipped | minutes |\n|---|---:|---:|---:|---:|\n");
    for side in s["sides"].as_array().into_iter().flatten() {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {:.1} |\n",
            side["side"].as_str().unwrap_or_default(),
            side["passed"],
            side["failed"],
            side["skipped"],
            side["seconds"].as_f64().unwrap_or(0.0) / 60.0
        ));
    }
    if let Some(r) = s["ratio_passed_virtual_to_host"].as_f64() {
        let c = &s["compared"];
        md.push_str(&format!(
            "\nOf the {} specs both sides ran, {} passed on the host and {} on the virtual cluster: ratio {r:.3}.\n",
            c["specs"], c["passed_host"], c["passed_virtual"]
        ));
    }
    let not_reached = s["not_reached_on_virtual"].as_array().map_or(0, Vec::len);
    if not_reached > 0 {
        md.push_str(&format!("{not_reached} specs the host ran were not reached on the virtual cluster before its timeout (listed in summary.json).\n"));
    }
    for side in s["sides"].as_array().into_iter().flatten() {
        for f in side["suite_failures"].as_array().into_iter().flatten() {
            md.push_str(&format!(
                "\nSuite failure on {}: {}\n",
                side["side"].as_str().unwrap_or_default(),
                f.as_str().unwrap_or_default()
            ));
        }
    }
    let list = |title: &str, items: &Value, md: &mut String| {
        let items = items.as_array().cloned().unwrap_or_default();
        md.push_str(&format!("\n## {title} ({})\n\n", items.len()));
        for i in items {
            md.push_str(&format!("- {}", i["spec"].as_str().unwrap_or_default()));
            if let Some(state) = i["virtual_state"].as_str() {
                md.push_str(&format!(" ({state})"));
            }
            if let Some(m) = i["message"].as_str() {
                md.push_str(&format!(":\n  `{}`", m.replace('\n', " ").replace('`', "'")));
            }
            md.push('\n');
        }
    };
    list("Pass on the host, not on the virtual cluster", &s["pass_on_host_not_on_virtual"], &mut md);
    list("Pass on the virtual cluster, not on the host", &s["pass_on_virtual_not_on_host"], &mut md);
    let missing: Vec<&str> = s["images_not_made"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    md.push_str(&format!(
        "\nImages named by the suite and not made here ({}): {}\n",
        missing.len(),
        missing.join(", ")
    ));
    md
}

/// The next Ctrl-C or SIGTERM.
async fn interrupted() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn shorten(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_string(),
    }
}

fn minutes(d: Duration) -> String {
    format!("{}m{:02}s", d.as_secs() / 60, d.as_secs() % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(text: &str, state: &str, failure: Option<&str>) -> Value {
        json!({"ContainerHierarchyTexts": ["[sig-x] Thing"], "LeafNodeText": text, "LeafNodeType": "It",
               "State": state, "RunTime": 2_000_000_000u64, "Failure": {"Message": failure.unwrap_or("")}})
    }

    #[test]
    fn the_summary_lists_what_passes_on_the_host_only() {
        let host = json!([{"SpecReports": [
            spec("works", "passed", None), spec("breaks here", "passed", None), spec("broken everywhere", "failed", Some("x")),
            spec("not selected", "skipped", None),
            {"LeafNodeType": "SynchronizedBeforeSuite", "State": "passed"},
        ]}]);
        let virt = json!([{"SpecReports": [
            spec("works", "passed", None), spec("breaks here", "failed", Some("timed out waiting")),
            spec("broken everywhere", "passed", None), spec("not selected", "skipped", None),
        ]}]);
        let mut sides = vec![parse_report(&host), parse_report(&virt)];
        sides[0].name = "host".into();
        sides[1].name = "virtual-v".into();
        assert_eq!(sides[0].specs.len(), 3, "specs the focus left out are not counted");
        let args = Args::parse_from(["hack/conformance"]);
        let s = summarize(&args, &sides, &[], Duration::from_secs(60));
        assert_eq!(s["sides"][0]["passed"], 2);
        assert_eq!(s["ratio_passed_virtual_to_host"], 1.0);
        assert_eq!(s["compared"]["specs"], 3);
        let only_host = s["pass_on_host_not_on_virtual"].as_array().unwrap();
        assert_eq!(only_host.len(), 1);
        assert_eq!(only_host[0]["spec"], "[sig-x] Thing breaks here");
        assert_eq!(only_host[0]["message"], "timed out waiting");
        assert_eq!(s["pass_on_virtual_not_on_host"][0]["spec"], "[sig-x] Thing broken everywhere");
        assert!(markdown(&s).contains("| virtual-v | 2 | 1 | 0 |"));
    }
}
