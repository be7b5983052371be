//! The dashboard's pages: server-rendered HTML, charts as inline SVG drawn here (no script, no
//! CDN: readable without JavaScript, and the machines have no internet), refreshed by the
//! browser every few seconds. Every text that comes from a cluster (names, labels, user names,
//! which a tenant chooses) is escaped.

use std::fmt::Write as _;

use html_escape::{encode_double_quoted_attribute as attr, encode_text as text};
use vkube::usage::Day;

use crate::cli::clusters::{Cluster, Status, human_age};

/// Days shown in the overview's chart, and on a cluster's page.
pub const OVERVIEW_DAYS: usize = 14;
pub const CLUSTER_DAYS: usize = 30;
/// A cluster this close to its expiry shows as Expiring.
const EXPIRING_WITHIN_SECONDS: i64 = 3600;

const STYLE: &str = "body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}\
table{border-collapse:collapse}td,th{padding:.35em .7em;border-bottom:1px solid #ddd;text-align:left;vertical-align:middle}\
th{background:#f4f4f4}.state{font-weight:600}.Running{color:#17803d}.Sleeping{color:#6d5bd0}.Paused,.Stopped{color:#777}\
.NotReady,.Expiring{color:#b3261e}small{color:#666}svg.chart rect.awake,svg.chart rect.cpu{fill:#3b82f6}\
svg.chart rect.asleep{fill:#a78bfa}.summary{margin:.5em 0 1.2em}";

/// What the dashboard calls a cluster's state.
pub fn state(c: &Cluster) -> &'static str {
    match c.status {
        Status::Ready => "Running",
        Status::Sleeping => "Sleeping",
        Status::Paused => "Paused",
        Status::NotReady => "NotReady",
        Status::Stopped => "Stopped",
    }
}

fn expiring(c: &Cluster) -> bool {
    c.expires_in_seconds.is_some_and(|s| s <= EXPIRING_WITHIN_SECONDS)
}

fn expires(c: &Cluster) -> String {
    match c.expires_in_seconds {
        Some(s) if s <= 0 => "due".into(),
        Some(s) => format!("in {}", human_age(s as u64)),
        None => "-".into(),
    }
}

fn page(title: &str, refresh_seconds: u64, body: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"{refresh_seconds}\">\
         <title>{}</title><style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n",
        text(title)
    )
}

/// The last `n` days up to `today` (`YYYY-MM-DD`), oldest first, with the cluster's figures.
fn last_days(c: &Cluster, today: jiff::Timestamp, n: usize) -> Vec<(String, Option<&Day>)> {
    (0..n)
        .rev()
        .map(|back| {
            let at = today.checked_sub(jiff::SignedDuration::from_hours(24 * back as i64)).unwrap_or(today);
            let day = vkube::usage::day_of(at);
            let figures = c.usage.days.get(&day);
            (day, figures)
        })
        .collect()
}

/// A bar chart: one bar per entry, each one or two stacked parts (class, value), with a tooltip.
fn bars(title: &str, entries: &[(String, Vec<(&'static str, f64)>)], unit: &str) -> String {
    let (w, h, gap) = (12.0, 60.0, 3.0);
    let max = entries.iter().map(|(_, parts)| parts.iter().map(|p| p.1).sum::<f64>()).fold(0.0, f64::max);
    let width = entries.len() as f64 * (w + gap);
    let mut svg = format!(
        "<svg class=\"chart\" role=\"img\" width=\"{width}\" height=\"{h}\" viewBox=\"0 0 {width} {h}\"><title>{}</title>",
        text(title)
    );
    for (i, (label, parts)) in entries.iter().enumerate() {
        let x = i as f64 * (w + gap);
        let mut y = h;
        for (class, v) in parts {
            let bar = if max > 0.0 { v / max * (h - 2.0) } else { 0.0 };
            y -= bar;
            let _ = write!(
                svg,
                "<rect class=\"{class}\" x=\"{x}\" y=\"{y:.1}\" width=\"{w}\" height=\"{bar:.1}\"><title>{}: {v:.2} {unit} {class}</title></rect>",
                text(label)
            );
        }
    }
    svg.push_str("</svg>");
    svg
}

/// A chart's entries per day: core-hours, and hours awake and asleep.
type Series = Vec<(String, Vec<(&'static str, f64)>)>;

fn series(days: &[(String, Option<&Day>)]) -> (Series, Series) {
    let cpu =
        days.iter().map(|(d, f)| (d.clone(), vec![("cpu", f.map_or(0.0, |f| hours(f.cpu_core_seconds)))])).collect();
    let power = days
        .iter()
        .map(|(d, f)| {
            let (a, s) = f.map_or((0.0, 0.0), |f| (hours(f.awake_seconds), hours(f.asleep_seconds)));
            (d.clone(), vec![("awake", a), ("asleep", s)])
        })
        .collect();
    (cpu, power)
}

fn hours(seconds: f64) -> f64 {
    seconds / 3600.0
}

fn link(c: &Cluster) -> String {
    format!("/clusters/{}/{}", c.namespace, c.name)
}

fn activity(c: &Cluster) -> String {
    match (&c.last_activity, &c.last_activity_by) {
        (Some(at), Some(by)) => format!("{}<br><small>{}</small>", text(at), text(by)),
        _ => "-".into(),
    }
}

/// Every cluster: state, labels, last activity, core-hours per day, awake/asleep, savings, expiry.
pub fn overview(clusters: &[Cluster], now: jiff::Timestamp, refresh_seconds: u64) -> String {
    let first = last_days_start(now, OVERVIEW_DAYS);
    let count = |s: &str| clusters.iter().filter(|c| state(c) == s).count();
    let totals = clusters.iter().fold(Day::default(), |sum, c| sum.plus(&c.usage.total_since(&first)));
    let mut body = format!(
        "<h1>Virtual clusters</h1>\n<p class=\"summary\" id=\"summary\">{} clusters: {} running, {} sleeping, {} paused, {} expiring. \
         Last {OVERVIEW_DAYS} days: {:.2} core-hours and {:.2} GiB-hours requested, {:.2} core-hours saved by sleeping.</p>\n",
        clusters.len(),
        count("Running"),
        count("Sleeping"),
        count("Paused"),
        clusters.iter().filter(|c| expiring(c)).count(),
        hours(totals.cpu_core_seconds),
        hours(totals.memory_gib_seconds),
        hours(totals.saved_cpu_core_seconds),
    );
    body.push_str(
        "<table id=\"clusters\"><thead><tr><th>Cluster</th><th>State</th><th>Labels</th><th>Last activity</th>\
         <th>Core-hours per day</th><th>Awake / asleep</th><th>Saved</th><th>Expires</th></tr></thead>\n<tbody>\n",
    );
    for c in clusters {
        let days = last_days(c, now, OVERVIEW_DAYS);
        let (cpu, power) = series(&days);
        let period = c.usage.total_since(&first);
        let labels: Vec<String> = c.labels.iter().map(|(k, v)| text(&format!("{k}={v}")).into_owned()).collect();
        let st = state(c);
        let _ = writeln!(
            body,
            "<tr data-cluster=\"{}/{}\" data-state=\"{st}\"{}><td><a href=\"{}\">{}</a><br><small>{}</small></td>\
             <td class=\"state {st}\">{st}{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.2} core-h</td><td>{}</td></tr>",
            attr(&c.namespace),
            attr(&c.name),
            if expiring(c) { " data-expiring=\"true\"" } else { "" },
            attr(&link(c)),
            text(&c.name),
            text(&c.namespace),
            if expiring(c) { " <span class=\"Expiring\">Expiring</span>" } else { "" },
            if labels.is_empty() { "-".into() } else { labels.join("<br>") },
            activity(c),
            bars(&format!("{} core-hours per day", c.name), &cpu, "core-h"),
            bars(&format!("{} hours awake and asleep per day", c.name), &power, "h"),
            hours(period.saved_cpu_core_seconds),
            expires(c),
        );
    }
    body.push_str("</tbody></table>\n");
    if clusters.is_empty() {
        body.push_str("<p>No virtual clusters yet: <code>vkube create NAME</code>.</p>\n");
    }
    page("vkube: virtual clusters", refresh_seconds, &body)
}

fn last_days_start(now: jiff::Timestamp, n: usize) -> String {
    let back = jiff::SignedDuration::from_hours(24 * (n as i64 - 1));
    vkube::usage::day_of(now.checked_sub(back).unwrap_or(now))
}

/// One cluster: its facts, its use per day (charts and a table), who used it.
pub fn cluster(c: &Cluster, now: jiff::Timestamp, refresh_seconds: u64) -> String {
    let days = last_days(c, now, CLUSTER_DAYS);
    let first = last_days_start(now, CLUSTER_DAYS);
    let period = c.usage.total_since(&first);
    let st = state(c);
    let mut body = format!(
        "<p><a href=\"/\">All clusters</a></p>\n<h1 data-cluster=\"{}/{}\" data-state=\"{st}\">{} <small>{}</small></h1>\n",
        attr(&c.namespace),
        attr(&c.name),
        text(&c.name),
        text(&c.namespace)
    );
    let labels: Vec<String> = c.labels.iter().map(|(k, v)| text(&format!("{k}={v}")).into_owned()).collect();
    let facts = [
        ("State", format!("<span class=\"state {st}\">{st}</span>")),
        ("Kubernetes", text(c.kubernetes_version.as_deref().unwrap_or("-")).into_owned()),
        ("Age", c.age_seconds.map(human_age).unwrap_or_else(|| "-".into())),
        ("Labels", if labels.is_empty() { "-".into() } else { labels.join(", ") }),
        ("Last activity", activity(c)),
        ("Expires", expires(c)),
    ];
    body.push_str("<table id=\"facts\">");
    for (k, v) in facts {
        let _ = write!(body, "<tr><th>{k}</th><td>{v}</td></tr>");
    }
    body.push_str("</table>\n");
    let (cpu, power) = series(&days);
    let _ = write!(
        body,
        "<h2>Last {CLUSTER_DAYS} days</h2>\n<p id=\"period\">{:.2} core-hours, {:.2} GiB-hours, {:.2} pod-hours requested; \
         {:.1} h awake, {:.1} h asleep; {:.2} core-hours and {:.2} GiB-hours saved by sleeping; {} requests.</p>\n\
         <h3>Core-hours per day</h3>{}\n<h3>Hours awake and asleep per day</h3>{}\n",
        hours(period.cpu_core_seconds),
        hours(period.memory_gib_seconds),
        hours(period.pod_seconds),
        hours(period.awake_seconds),
        hours(period.asleep_seconds),
        hours(period.saved_cpu_core_seconds),
        hours(period.saved_memory_gib_seconds),
        period.requests,
        bars("core-hours per day", &cpu, "core-h"),
        bars("hours awake and asleep per day", &power, "h"),
    );
    body.push_str(
        "<h3>Per day</h3>\n<table id=\"days\"><thead><tr><th>Day</th><th>Core-h</th><th>GiB-h</th><th>Pod-h</th>\
         <th>Storage GiB-h</th><th>Awake</th><th>Asleep</th><th>Saved core-h</th><th>Requests</th></tr></thead><tbody>\n",
    );
    for (day, f) in days.iter().rev().filter_map(|(d, f)| Some((d, (*f)?))) {
        let _ = writeln!(
            body,
            "<tr data-day=\"{day}\"><td>{day}</td><td>{:.3}</td><td>{:.3}</td><td>{:.2}</td><td>{:.2}</td><td>{:.1} h</td>\
             <td>{:.1} h</td><td>{:.3}</td><td>{}</td></tr>",
            hours(f.cpu_core_seconds),
            hours(f.memory_gib_seconds),
            hours(f.pod_seconds),
            hours(f.storage_gib_seconds),
            hours(f.awake_seconds),
            hours(f.asleep_seconds),
            hours(f.saved_cpu_core_seconds),
            f.requests
        );
    }
    body.push_str("</tbody></table>\n<h3>Requests by user</h3>\n<table id=\"users\"><tbody>\n");
    for (user, n) in &period.requests_by_user {
        let _ = writeln!(body, "<tr><td>{}</td><td>{n}</td></tr>", text(user));
    }
    body.push_str("</tbody></table>\n");
    page(&format!("vkube: {}", c.name), refresh_seconds, &body)
}

/// A page that says why it is not shown, and what to do.
pub fn refused(title: &str, what_to_do: &str) -> String {
    page(title, 3600, &format!("<h1>{}</h1>\n<p id=\"refused\">{}</p>", text(title), what_to_do))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::clusters::Mode;

    fn sample(name: &str, status: Status, by: &str) -> Cluster {
        let mut usage = vkube::usage::Ledger::default();
        let r = vkube::usage::PodResources { cpu: 0.5, ..Default::default() };
        usage.day("2026-12-04T08:00:00Z".parse().unwrap()).hold(r, 1.0, 0.0, 7200.0);
        usage.day("2026-12-04T08:00:00Z".parse().unwrap()).awake_seconds = 7200.0;
        Cluster {
            name: name.into(),
            namespace: format!("vkube-{name}"),
            mode: Mode::Local,
            status,
            ready: status == Status::Ready,
            endpoint: None,
            created: None,
            age_seconds: Some(90),
            kubernetes_version: Some("v1.37.2".into()),
            labels: [("team".to_string(), "a&b".to_string())].into(),
            power_since: None,
            last_activity: Some("2026-12-04T09:00:00Z".into()),
            last_activity_by: Some(by.into()),
            expires_at: None,
            expiry_reason: None,
            expires_in_seconds: Some(600),
            usage,
        }
    }

    #[test]
    fn every_cluster_a_row_with_its_charts_and_tenant_text_escaped() {
        let now: jiff::Timestamp = "2026-12-04T12:00:00Z".parse().unwrap();
        let cs = [sample("a", Status::Ready, "<script>alert(1)</script>"), sample("b", Status::Sleeping, "dev")];
        let html = overview(&cs, now, 15);
        assert!(!html.contains("<script"), "{html}");
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(html.contains("team=a&amp;b"));
        assert!(html.contains(r#"<tr data-cluster="vkube-a/a" data-state="Running" data-expiring="true">"#), "{html}");
        assert!(html.contains(r#"data-cluster="vkube-b/b" data-state="Sleeping""#));
        assert!(html.contains("2 clusters: 1 running, 1 sleeping, 0 paused, 2 expiring"), "{html}");
        assert!(html.contains("content=\"15\""), "refreshes itself");
        // Each row: 8 cells, a core-hours chart of 14 days and an awake/asleep chart of 14 × 2.
        let row = html.split("<tr data-cluster=").nth(1).unwrap().split("</tr>").next().unwrap();
        assert_eq!(row.matches("<td").count(), 8);
        assert_eq!(row.matches("<rect class=\"cpu\"").count(), OVERVIEW_DAYS);
        assert_eq!(row.matches("<rect class=\"a").count(), 2 * OVERVIEW_DAYS);
        assert!(row.contains("<title>2026-12-04: 1.00 core-h cpu</title>"), "{row}");

        let one = super::cluster(&cs[0], now, 15);
        assert!(one.contains(r#"<tr data-day="2026-12-04"><td>2026-12-04</td><td>1.000</td>"#), "{one}");
        assert!(!one.contains("<script"));
        assert!(one.contains("1.00 core-hours"));
    }
}
