//! Addresses a tenant writes itself: the Endpoints and EndpointSlices of its selector-less
//! Services. On the host they are routed like any Service's (kube-proxy, and the virtual API
//! server's own connections to webhooks and aggregated APIs through the cluster's Services), so
//! an address the tenant picks would reach whatever the host holds there: another tenant's pods,
//! the host's nodes and API server, from where the control plane stands (CVE-2021-25740 is the
//! same, inside one cluster). An address crosses only if it is one of this cluster's own pods
//! (as the host reports them) or in a range the platform admin lists.

use std::net::IpAddr;

use ipnet::IpNet;

/// At most this many addresses named in one refusal (an event's message has a limit).
const NAMED: usize = 5;

/// An address as the host's Go code reads it: an IPv4-mapped IPv6 address is the IPv4 one, so
/// it is judged as that (a range of IPv6 addresses must not let IPv4 ones through).
pub fn parse(s: &str) -> Option<IpAddr> {
    s.parse::<IpAddr>().ok().map(|a| a.to_canonical())
}

/// Why the addresses `(field, ip)` may not reach the host, if any may not: each one that is
/// neither `own_pod` nor in `ranges`, in the API server's words (pure).
pub fn violation<'a>(
    ranges: &[IpNet],
    own_pod: impl Fn(&IpAddr) -> bool,
    addresses: impl IntoIterator<Item = (String, &'a str)>,
) -> Option<String> {
    let bad: Vec<String> = addresses
        .into_iter()
        .filter_map(|(field, ip)| match parse(ip) {
            None => Some(format!("{field}: Invalid value: {ip:?}: not an IP address")),
            Some(a) if own_pod(&a) || ranges.iter().any(|n| n.contains(&a)) => None,
            Some(_) => Some(format!("{field}: Invalid value: {ip:?}")),
        })
        .collect();
    if bad.is_empty() {
        return None;
    }
    let more = bad.len().saturating_sub(NAMED);
    let ranges = super::listed(ranges);
    Some(format!(
        "{}{}: an endpoint address must be one of this cluster's pods or in the ranges the platform admin \
         allows (policy.endpointCIDRs: {ranges}); give the Service a selector, or ask the admin to add the range",
        bad.into_iter().take(NAMED).collect::<Vec<_>>().join("; "),
        if more > 0 { format!(" (and {more} more)") } else { String::new() }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pods(ip: &IpAddr) -> bool {
        *ip == "10.244.0.7".parse::<IpAddr>().unwrap()
    }

    #[test]
    fn own_pods_and_admin_ranges_cross_nothing_else() {
        let ranges: Vec<IpNet> = vec!["192.0.2.0/24".parse().unwrap(), "2001:db8::/64".parse().unwrap()];
        let one = |ip: &'static str| violation(&ranges, pods, [("subsets[0].addresses[0].ip".to_string(), ip)]);
        assert_eq!(one("10.244.0.7"), None, "one of the cluster's pods");
        assert_eq!(one("192.0.2.10"), None, "in an admin's range");
        assert_eq!(one("2001:db8::5"), None);
        let other = one("10.244.0.8").unwrap();
        assert!(other.starts_with("subsets[0].addresses[0].ip: Invalid value: \"10.244.0.8\""), "{other}");
        assert!(other.contains("192.0.2.0/24, 2001:db8::/64"), "{other}");
        assert!(one("no-ip").unwrap().contains("not an IP address"));
        let everything_v6: Vec<IpNet> = vec!["::/0".parse().unwrap()];
        let mapped = [("a".to_string(), "::ffff:10.0.0.1")];
        assert!(violation(&everything_v6, pods, mapped).is_some(), "an IPv4 address in IPv6 dress");
        assert_eq!(violation(&ranges, pods, [("a".to_string(), "::ffff:192.0.2.10")]), None);
        let none = violation(&[], pods, [("endpoints[0].addresses[0]".to_string(), "192.0.2.10")]).unwrap();
        assert!(none.contains("policy.endpointCIDRs: none"), "{none}");
    }

    #[test]
    fn every_bad_address_is_named_up_to_a_few() {
        let ips: Vec<String> = (1..=8).map(|i| format!("198.51.100.{i}")).collect();
        let why = violation(&[], pods, ips.iter().enumerate().map(|(i, ip)| (format!("a[{i}]"), ip.as_str()))).unwrap();
        assert!(why.contains("a[0]") && why.contains("a[4]") && !why.contains("a[5]"), "{why}");
        assert!(why.contains("(and 3 more)"), "{why}");
    }
}
