//! `vkube usage`: what each virtual cluster used of the host (its control plane's ledger on its
//! host Service), with an estimated cost when prices are given (requests × price per hour, the
//! way OpenCost prices requests).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};
use vkube::usage::Day;

use super::clusters::Cluster;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum UsageOutput {
    Table,
    Json,
    Csv,
}

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  vkube usage\n  vkube usage --since 7d --cpu-price 0.031 --memory-price 0.004\n  \
                        vkube usage team-a -o csv")]
pub struct UsageArgs {
    /// One cluster, one row per day (default: every cluster, one row each).
    pub name: Option<String>,
    /// Only this host namespace (with NAME: its namespace, default vkube-NAME).
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
    /// Only clusters whose labels (`vkube create --label`) match this selector, e.g. `team=a`.
    #[arg(long, short = 'l')]
    pub selector: Option<String>,
    /// How far back: the UTC days from the one this long ago to today (the ledger keeps 92).
    #[arg(long, default_value = "30d", value_parser = vkube::controlplane::parse_duration)]
    pub since: Duration,
    /// Price of one requested core for an hour.
    #[arg(long)]
    pub cpu_price: Option<f64>,
    /// Price of one requested GiB of memory for an hour.
    #[arg(long)]
    pub memory_price: Option<f64>,
    /// Price of one requested GiB of storage for an hour.
    #[arg(long)]
    pub storage_price: Option<f64>,
    /// Prices from a YAML or JSON file: `{cpu: 0.031, memory: 0.004, storage: 0.0001}` (per
    /// hour; the flags win).
    #[arg(long)]
    pub prices: Option<PathBuf>,
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    pub output: UsageOutput,
}

/// Prices per hour of one core, one GiB of memory, one GiB of storage.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prices {
    #[serde(default)]
    pub cpu: f64,
    #[serde(default)]
    pub memory: f64,
    #[serde(default)]
    pub storage: f64,
}

/// One row: a cluster's use over the period, or one day of it.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Row {
    pub name: String,
    pub namespace: String,
    /// The UTC day (per-day rows only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub day: Option<String>,
    pub status: String,
    pub last_activity: Option<String>,
    pub last_activity_by: Option<String>,
    pub core_hours: f64,
    pub gib_hours: f64,
    pub cpu_limit_core_hours: f64,
    pub memory_limit_gib_hours: f64,
    pub pod_hours: f64,
    pub storage_gib_hours: f64,
    pub hours_awake: f64,
    pub hours_asleep: f64,
    pub saved_core_hours: f64,
    pub saved_gib_hours: f64,
    pub requests: u64,
    /// Requests that counted as activity, by user (the busiest).
    pub requests_by_user: std::collections::BTreeMap<String, u64>,
    /// Estimated from the prices (requests, not use); absent without prices.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub saved_cost: Option<f64>,
}

fn row(c: &Cluster, day: Option<&str>, d: &Day, prices: Option<Prices>) -> Row {
    let h = |s: f64| s / 3600.0;
    Row {
        name: c.name.clone(),
        namespace: c.namespace.clone(),
        day: day.map(str::to_string),
        status: serde_json::to_value(c.status).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default(),
        last_activity: c.last_activity.clone(),
        last_activity_by: c.last_activity_by.clone(),
        core_hours: h(d.cpu_core_seconds),
        gib_hours: h(d.memory_gib_seconds),
        cpu_limit_core_hours: h(d.cpu_limit_core_seconds),
        memory_limit_gib_hours: h(d.memory_limit_gib_seconds),
        pod_hours: h(d.pod_seconds),
        storage_gib_hours: h(d.storage_gib_seconds),
        hours_awake: h(d.awake_seconds),
        hours_asleep: h(d.asleep_seconds),
        saved_core_hours: h(d.saved_cpu_core_seconds),
        saved_gib_hours: h(d.saved_memory_gib_seconds),
        requests: d.requests,
        requests_by_user: d.requests_by_user.clone(),
        cost: prices.map(|p| {
            p.cpu * h(d.cpu_core_seconds) + p.memory * h(d.memory_gib_seconds) + p.storage * h(d.storage_gib_seconds)
        }),
        saved_cost: prices.map(|p| p.cpu * h(d.saved_cpu_core_seconds) + p.memory * h(d.saved_memory_gib_seconds)),
    }
}

/// One row per cluster over the days from `first`, or with `per_day` one per day of each.
pub fn rows(clusters: &[Cluster], first: &str, per_day: bool, prices: Option<Prices>) -> Vec<Row> {
    clusters
        .iter()
        .flat_map(|c| {
            if per_day {
                c.usage.since(first).map(|(day, d)| row(c, Some(day), d, prices)).collect()
            } else {
                vec![row(c, None, &c.usage.total_since(first), prices)]
            }
        })
        .collect()
}

impl UsageArgs {
    fn prices(&self) -> anyhow::Result<Option<Prices>> {
        let mut p = match &self.prices {
            Some(file) => {
                let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
                Some(serde_saphyr::from_str::<Prices>(&text).with_context(|| {
                    format!("{}: expected e.g. `{{cpu: 0.031, memory: 0.004, storage: 0.0001}}`", file.display())
                })?)
            }
            None => None,
        };
        for (flag, set) in [
            (self.cpu_price, (|p: &mut Prices, v| p.cpu = v) as fn(&mut Prices, f64)),
            (self.memory_price, |p, v| p.memory = v),
            (self.storage_price, |p, v| p.storage = v),
        ] {
            if let Some(v) = flag {
                anyhow::ensure!(v >= 0.0 && v.is_finite(), "prices are hourly amounts of at least 0, not {v}");
                set(p.get_or_insert_with(Prices::default), v);
            }
        }
        Ok(p)
    }

    pub async fn run(self) -> anyhow::Result<()> {
        let prices = self.prices()?;
        let host = super::host_client().await?;
        let mut clusters = match &self.name {
            Some(name) => {
                let target = super::Target { name: name.clone(), namespace: self.namespace.clone() };
                vec![super::clusters::require(&host, &target).await?]
            }
            None => super::clusters::list(&host, self.namespace.as_deref(), self.selector.as_deref()).await?,
        };
        let one_namespace = match &self.name {
            Some(_) => clusters.first().map(|c| c.namespace.clone()),
            None => self.namespace.clone(),
        };
        super::clusters::with_usage(&host, one_namespace.as_deref(), &mut clusters).await?;
        let since = jiff::SignedDuration::try_from(self.since).context("--since")?;
        let first = vkube::usage::day_of(jiff::Timestamp::now().checked_sub(since).context("--since is too long")?);
        let rows = rows(&clusters, &first, self.name.is_some(), prices);
        match self.output {
            UsageOutput::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
            UsageOutput::Csv => print!("{}", csv(&rows)),
            UsageOutput::Table => {
                print!("{}", table(&rows, self.name.is_some()));
                if rows.is_empty() {
                    eprintln!("no usage recorded since {first} (`vkube list` shows the clusters)");
                }
            }
        }
        Ok(())
    }
}

const CSV_HEADER: &str = "name,namespace,day,status,lastActivity,lastActivityBy,coreHours,gibHours,\
cpuLimitCoreHours,memoryLimitGibHours,podHours,storageGibHours,hoursAwake,hoursAsleep,savedCoreHours,\
savedGibHours,requests,cost,savedCost";

fn csv(rows: &[Row]) -> String {
    // Quoted when needed; a cell a spreadsheet would take for a formula starts with `'` (user
    // names are the tenant's choice).
    let field = |s: &str| {
        let s = if s.starts_with(['=', '+', '-', '@', '\t', '\r']) { format!("'{s}") } else { s.to_string() };
        if s.contains([',', '"', '\n', '\r']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s }
    };
    let opt = |v: Option<f64>| v.map(|v| format!("{v:.6}")).unwrap_or_default();
    let mut out = format!("{CSV_HEADER}\n");
    for r in rows {
        let cells = [
            field(&r.name),
            field(&r.namespace),
            r.day.clone().unwrap_or_default(),
            r.status.clone(),
            r.last_activity.clone().unwrap_or_default(),
            field(r.last_activity_by.as_deref().unwrap_or_default()),
            format!("{:.6}", r.core_hours),
            format!("{:.6}", r.gib_hours),
            format!("{:.6}", r.cpu_limit_core_hours),
            format!("{:.6}", r.memory_limit_gib_hours),
            format!("{:.6}", r.pod_hours),
            format!("{:.6}", r.storage_gib_hours),
            format!("{:.6}", r.hours_awake),
            format!("{:.6}", r.hours_asleep),
            format!("{:.6}", r.saved_core_hours),
            format!("{:.6}", r.saved_gib_hours),
            r.requests.to_string(),
            opt(r.cost),
            opt(r.saved_cost),
        ];
        out.push_str(&cells.join(","));
        out.push('\n');
    }
    out
}

fn table(rows: &[Row], per_day: bool) -> String {
    let mut out = format!(
        "{:<20} {:<11} {:>10} {:>10} {:>9} {:>10} {:>7} {:>7} {:>10} {:>8} {:>9} LAST ACTIVITY\n",
        if per_day { "DAY" } else { "NAME" },
        "STATUS",
        "CORE-H",
        "GIB-H",
        "POD-H",
        "STORAGE-H",
        "AWAKE",
        "ASLEEP",
        "SAVED-C-H",
        "REQUESTS",
        "COST",
    );
    for r in rows {
        let activity = match (&r.last_activity, &r.last_activity_by) {
            (Some(at), Some(by)) => format!("{at} ({})", super::clusters::printable(by)),
            _ => "-".into(),
        };
        out.push_str(&format!(
            "{:<20} {:<11} {:>10.3} {:>10.3} {:>9.2} {:>10.2} {:>6.1}h {:>6.1}h {:>10.3} {:>8} {:>9} {}\n",
            r.day.as_deref().unwrap_or(&r.name),
            r.status,
            r.core_hours,
            r.gib_hours,
            r.pod_hours,
            r.storage_gib_hours,
            r.hours_awake,
            r.hours_asleep,
            r.saved_core_hours,
            r.requests,
            r.cost.map(|c| format!("{c:.2}")).unwrap_or_else(|| "-".into()),
            activity,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::clusters::{Mode, Status};

    fn cluster(name: &str) -> Cluster {
        let mut usage = vkube::usage::Ledger::default();
        let r = vkube::usage::PodResources { cpu: 0.5, memory: 2.0 * 1024f64.powi(3), ..Default::default() };
        usage.day("2026-12-01T12:00:00Z".parse().unwrap()).hold(r, 1.0, 0.0, 7200.0);
        usage.day("2026-12-03T12:00:00Z".parse().unwrap()).hold(r, 1.0, 0.0, 3600.0);
        usage.day("2026-12-03T12:00:00Z".parse().unwrap()).asleep(r, 3600.0);
        Cluster {
            name: name.into(),
            namespace: format!("vkube-{name}"),
            mode: Mode::Local,
            status: Status::Sleeping,
            ready: false,
            endpoint: None,
            created: None,
            age_seconds: None,
            kubernetes_version: None,
            labels: Default::default(),
            power_since: None,
            last_activity: Some("2026-12-03T12:00:00Z".into()),
            last_activity_by: Some("dev, \"x\"".into()),
            expires_at: None,
            expiry_reason: None,
            expires_in_seconds: None,
            usage,
        }
    }

    #[test]
    fn rows_per_cluster_or_per_day_priced_by_requests() {
        let cs = [cluster("a")];
        let prices = Some(Prices { cpu: 0.04, memory: 0.005, storage: 0.0 });
        let all = rows(&cs, "2026-12-01", false, prices);
        assert_eq!(all.len(), 1);
        assert_eq!((all[0].core_hours, all[0].gib_hours, all[0].pod_hours), (1.5, 6.0, 3.0));
        assert!((all[0].cost.unwrap() - (1.5 * 0.04 + 6.0 * 0.005)).abs() < 1e-12);
        assert!((all[0].saved_cost.unwrap() - (0.5 * 0.04 + 2.0 * 0.005)).abs() < 1e-12);
        let recent = rows(&cs, "2026-12-02", true, None);
        assert_eq!(recent.len(), 1, "only the days since");
        assert_eq!((recent[0].day.as_deref(), recent[0].hours_asleep, recent[0].cost), (Some("2026-12-03"), 1.0, None));
        let text = csv(&all);
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some(CSV_HEADER));
        let cells = lines.next().unwrap();
        assert!(
            cells.starts_with("a,vkube-a,,Sleeping,2026-12-03T12:00:00Z,\"dev, \"\"x\"\"\",1.500000,6.000000,"),
            "{cells}"
        );
        assert_eq!(CSV_HEADER.split(',').count(), 19);
        assert!(table(&all, false).lines().nth(1).unwrap().starts_with("a "));
        let mut hostile = cluster("b");
        hostile.last_activity_by = Some("=HYPERLINK(\"x\")\r".into());
        let line = csv(&rows(&[hostile], "2026-12-01", false, None));
        assert!(line.contains(",\"'=HYPERLINK(\"\"x\"\")\r\","), "{line}");
    }

    #[test]
    fn prices_from_a_file_and_flags() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("prices.yaml");
        std::fs::write(&file, "cpu: 0.03\nmemory: 0.004\n").unwrap();
        let args = |extra: &[&str]| {
            #[derive(clap::Parser)]
            struct P {
                #[command(flatten)]
                a: UsageArgs,
            }
            let mut argv = vec!["usage"];
            argv.extend_from_slice(extra);
            <P as clap::Parser>::parse_from(argv).a
        };
        let f = file.to_str().unwrap();
        let p = args(&["--prices", f, "--memory-price", "0.01"]).prices().unwrap().unwrap();
        assert_eq!(p, Prices { cpu: 0.03, memory: 0.01, storage: 0.0 });
        assert_eq!(args(&[]).prices().unwrap(), None);
        assert!(args(&["--cpu-price=-1"]).prices().is_err());
        std::fs::write(&file, "gpu: 3\n").unwrap();
        let e = args(&["--prices", f]).prices().unwrap_err();
        assert!(format!("{e:#}").contains("expected e.g."), "{e:#}");
    }
}
