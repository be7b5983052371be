//! Where a tenant's NetworkPolicies may open its pods' egress on the host. Policies only add
//! allowances, so a tenant policy allowing egress to an address range would override the admin's
//! own policies in the host namespace for its pods (the cloud's metadata address, the nodes, the
//! host's API server, other networks): a range crosses only inside one the admin lists, and a rule
//! allowing every destination means this cluster's pods, its control plane and those ranges.

use ipnet::IpNet;

/// Whether egress to `cidr` may cross: inside a range the admin lists (pure).
pub fn allowed(ranges: &[IpNet], cidr: &str) -> bool {
    let Ok(net) = cidr.parse::<IpNet>() else { return false };
    // An IPv4 range written as IPv6 is read as IPv4 by some network plugins.
    let mapped = matches!(net, IpNet::V6(n) if n.addr().to_ipv4_mapped().is_some() && n.prefix_len() >= 96);
    !mapped && ranges.iter().any(|r| r.contains(&net))
}

/// What of the range `cidr` (less `except`) egress may reach: itself if it lies in an admin's
/// range, else the admin's ranges inside it (less the exceptions inside those), else nothing
/// (pure): the tenant's allowance and the admin's, both.
pub fn within(ranges: &[IpNet], cidr: &str, except: &[String]) -> Vec<(IpNet, Vec<String>)> {
    let Ok(net) = cidr.parse::<IpNet>() else { return vec![] };
    if allowed(ranges, cidr) {
        return vec![(net, except.to_vec())];
    }
    let excepts: Vec<IpNet> = except.iter().filter_map(|e| e.parse().ok()).collect();
    ranges
        .iter()
        .filter(|r| net.contains(*r) && !excepts.iter().any(|e| e.contains(*r)))
        .map(|r| (*r, excepts.iter().filter(|e| r.contains(*e)).map(ToString::to_string).collect()))
        .collect()
}

/// The first ipBlock `(field, cidr)` outside every range the admin lists, and why (pure).
pub fn violation<'a>(ranges: &[IpNet], blocks: impl IntoIterator<Item = (String, &'a str)>) -> Option<String> {
    for (field, cidr) in blocks {
        if cidr.parse::<IpNet>().is_err() {
            return Some(format!("{field}: Invalid value: {cidr:?}: not a CIDR"));
        }
        if !allowed(ranges, cidr) {
            let listed = super::listed(ranges);
            return Some(format!(
                "{field}: Invalid value: {cidr:?}: egress may reach this cluster's pods and only the ranges the \
                 platform admin allows (policy.egressCIDRs: {listed}); name pods instead, or ask the admin"
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wider_range_is_narrowed_to_the_admins_inside_it() {
        let ranges: Vec<IpNet> = vec!["203.0.113.0/24".parse().unwrap(), "198.51.100.0/24".parse().unwrap()];
        let internet = within(&ranges, "0.0.0.0/0", &["198.51.100.0/25".into(), "10.0.0.0/8".into()]);
        assert_eq!(
            internet,
            vec![
                ("203.0.113.0/24".parse().unwrap(), vec![]),
                ("198.51.100.0/24".parse().unwrap(), vec!["198.51.100.0/25".to_string()])
            ]
        );
        assert_eq!(within(&ranges, "203.0.113.8/29", &[]), vec![("203.0.113.8/29".parse().unwrap(), vec![])]);
        assert!(within(&ranges, "10.0.0.0/8", &[]).is_empty(), "no admin range inside it");
        assert!(within(&ranges, "0.0.0.0/0", &["203.0.0.0/8".into(), "198.0.0.0/8".into()]).is_empty());
    }

    #[test]
    fn only_inside_the_admins_ranges() {
        let ranges: Vec<IpNet> = vec!["203.0.113.0/24".parse().unwrap(), "2001:db8::/32".parse().unwrap()];
        let one = |cidr: &'static str| violation(&ranges, [("egress[0].to[0].ipBlock.cidr".to_string(), cidr)]);
        assert_eq!(one("203.0.113.0/24"), None);
        assert_eq!(one("203.0.113.8/29"), None);
        assert_eq!(one("2001:db8:1::/48"), None);
        let wide = one("0.0.0.0/0").unwrap();
        assert!(wide.starts_with("egress[0].to[0].ipBlock.cidr: Invalid value: \"0.0.0.0/0\""), "{wide}");
        assert!(wide.contains("203.0.113.0/24, 2001:db8::/32"), "{wide}");
        assert!(one("169.254.169.254/32").is_some());
        assert!(one("not-a-cidr").unwrap().contains("not a CIDR"));
        let all_v6: Vec<IpNet> = vec!["::/0".parse().unwrap()];
        assert!(violation(&all_v6, [("f".to_string(), "::ffff:169.254.0.0/112")]).is_some(), "IPv4 in IPv6 dress");
        assert!(violation(&[], [("f".to_string(), "203.0.113.0/24")]).unwrap().contains("egressCIDRs: none"));
    }
}
