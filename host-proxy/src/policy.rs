//! The egress policy: which destinations the enclave may reach.
//!
//! Sans-IO: a [`Policy`] is a list of [`Rule`]s and [`Policy::check`] is a pure function.
//! The most specific matching rule wins: a longer prefix beats a shorter one; at equal prefix, a
//! rule naming fewer ports beats one naming more; at a full tie, deny beats allow.
//!
//! The defaults deny the instance metadata service (169.254.0.0/16 and AWS's IPv6 IMDS address
//! `fd00:ec2::254`), loopback (127.0.0.0/8, `::1`), and the "this host" addresses (0.0.0.0/8, `::`)
//! that Linux also routes to the parent itself. Everything else is allowed. Operator rules are
//! added on top, so `--allow 169.254.169.254/32:80` re-opens one port of IMDS.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use common::ports::{PortError, PortSet};

/// An IP network: an address and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

/// Why a CIDR or a rule could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    /// The address part was not an IP address.
    #[error("{0:?} is not an IP address")]
    Addr(String),
    /// The prefix was missing, not a number, or too long for the family.
    #[error("{0:?} is not a valid prefix length")]
    Prefix(String),
    /// The port part was not a port list.
    #[error("bad port list: {0}")]
    Ports(#[from] PortError),
}

impl Cidr {
    /// Builds a CIDR, checking the prefix against the family.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Cidr> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (prefix <= max).then_some(Cidr {
            addr: canonical(addr),
            prefix,
        })
    }

    /// Whether `ip` is inside this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) are treated as the IPv4 address they carry, so
/// that `::ffff:127.0.0.1` cannot slip past a rule for 127.0.0.0/8.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

impl FromStr for Cidr {
    type Err = RuleError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .trim_matches(|c| c == '[' || c == ']')
            .parse()
            .map_err(|_| RuleError::Addr(addr.into()))?;
        let prefix = match prefix {
            Some(p) => p.parse().map_err(|_| RuleError::Prefix(p.into()))?,
            None if addr.is_ipv4() => 32,
            None => 128,
        };
        Cidr::new(addr, prefix).ok_or_else(|| RuleError::Prefix(s.into()))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// What a rule does to the connections it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    /// Let the connection through.
    Allow,
    /// Answer `denied`.
    Deny,
}

/// One `CIDR[:PORTS]` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The network it covers.
    pub net: Cidr,
    /// The ports it covers; `None` is every port.
    pub ports: Option<PortSet>,
    /// What it does.
    pub action: Action,
}

impl Rule {
    /// Parses `CIDR[:PORTS]`: `10.0.0.0/8`, `10.0.0.0/8:80,443`, `1.2.3.4:22`,
    /// `2001:db8::/32:443` or `[2001:db8::1]:443`.
    pub fn parse(s: &str, action: Action) -> Result<Rule, RuleError> {
        let (net, ports) = split_ports(s);
        Ok(Rule {
            net: net.parse()?,
            ports: ports.map(str::parse).transpose()?,
            action,
        })
    }

    fn matches(&self, dst: SocketAddr) -> bool {
        self.net.contains(dst.ip()) && self.ports.as_ref().is_none_or(|p| p.contains(dst.port()))
    }

    /// Orders rules so that the greatest is the most specific.
    fn specificity(&self) -> (u8, std::cmp::Reverse<u32>, Action) {
        let ports = self.ports.as_ref().map_or(65535, PortSet::len);
        (self.net.prefix, std::cmp::Reverse(ports), self.action)
    }
}

/// Splits `NET[:PORTS]`, where NET may itself be an IPv6 address full of colons.
fn split_ports(s: &str) -> (&str, Option<&str>) {
    if let Some(rest) = s.strip_prefix('[') {
        // [v6] or [v6]:ports or [v6]/len:ports
        if let Some(close) = rest.find(']') {
            let after = &s[close + 2..];
            let net_end = close + 2 + after.find(':').unwrap_or(after.len());
            let (net, ports) = s.split_at(net_end);
            return (net, ports.strip_prefix(':'));
        }
        return (s, None);
    }
    if let Some((net, prefix_and_ports)) = s.split_once('/') {
        return match prefix_and_ports.split_once(':') {
            Some((prefix, ports)) => (&s[..net.len() + 1 + prefix.len()], Some(ports)),
            None => (s, None),
        };
    }
    // No prefix: an IPv4 address may carry `:ports`; a bare IPv6 address may not.
    match s.split_once(':') {
        Some((net, ports)) if net.parse::<std::net::Ipv4Addr>().is_ok() => (net, Some(ports)),
        _ => (s, None),
    }
}

/// The ordered egress rule set.
#[derive(Debug, Clone)]
pub struct Policy {
    rules: Vec<Rule>,
}

impl Policy {
    /// The built-in denials plus the operator's rules.
    pub fn new(operator: Vec<Rule>) -> Policy {
        let defaults = [
            "169.254.0.0/16",
            "127.0.0.0/8",
            "0.0.0.0/8",
            "::1/128",
            "::/128",
            "fd00:ec2::254/128",
        ];
        let mut rules: Vec<Rule> = defaults
            .iter()
            .filter_map(|n| Rule::parse(n, Action::Deny).ok())
            .collect();
        rules.extend(operator);
        Policy { rules }
    }

    /// Decides whether the enclave may connect to `dst`.
    pub fn check(&self, dst: SocketAddr) -> Action {
        self.rules
            .iter()
            .filter(|r| r.matches(dst))
            .max_by_key(|r| r.specificity())
            .map_or(Action::Allow, |r| r.action)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn defaults_deny_metadata_and_loopback_only() {
        let p = Policy::new(vec![]);
        assert_eq!(p.check(sa("169.254.169.254:80")), Action::Deny);
        assert_eq!(p.check(sa("127.0.0.1:22")), Action::Deny);
        assert_eq!(p.check(sa("0.0.0.0:22")), Action::Deny);
        assert_eq!(p.check(sa("[::1]:22")), Action::Deny);
        assert_eq!(p.check(sa("[::ffff:127.0.0.1]:22")), Action::Deny);
        assert_eq!(p.check(sa("[fd00:ec2::254]:80")), Action::Deny);
        assert_eq!(p.check(sa("93.184.216.34:443")), Action::Allow);
        assert_eq!(p.check(sa("10.1.2.3:443")), Action::Allow);
    }

    #[test]
    fn most_specific_wins() {
        let p = Policy::new(vec![
            Rule::parse("10.0.0.0/8", Action::Deny).unwrap(),
            Rule::parse("10.1.0.0/16", Action::Allow).unwrap(),
            Rule::parse("10.1.2.0/24:22", Action::Deny).unwrap(),
            Rule::parse("169.254.169.254/32:80", Action::Allow).unwrap(),
        ]);
        assert_eq!(p.check(sa("10.9.9.9:80")), Action::Deny);
        assert_eq!(p.check(sa("10.1.9.9:80")), Action::Allow);
        assert_eq!(p.check(sa("10.1.2.3:22")), Action::Deny);
        assert_eq!(p.check(sa("10.1.2.3:23")), Action::Allow);
        assert_eq!(p.check(sa("169.254.169.254:80")), Action::Allow);
        assert_eq!(p.check(sa("169.254.169.254:81")), Action::Deny);
    }

    #[test]
    fn narrower_ports_win_and_deny_breaks_ties() {
        let p = Policy::new(vec![
            Rule::parse("10.0.0.0/8:1-1000", Action::Deny).unwrap(),
            Rule::parse("10.0.0.0/8:443", Action::Allow).unwrap(),
            Rule::parse("10.2.0.0/16", Action::Allow).unwrap(),
            Rule::parse("10.2.0.0/16", Action::Deny).unwrap(),
        ]);
        assert_eq!(p.check(sa("10.0.0.1:443")), Action::Allow);
        assert_eq!(p.check(sa("10.0.0.1:80")), Action::Deny);
        assert_eq!(p.check(sa("10.2.0.1:80")), Action::Deny);
    }

    #[test]
    fn rule_syntax() {
        let r = Rule::parse("2001:db8::/32:443", Action::Allow).unwrap();
        assert_eq!(r.net.to_string(), "2001:db8::/32");
        assert!(r.ports.unwrap().contains(443));
        let r = Rule::parse("[2001:db8::1]:80", Action::Allow).unwrap();
        assert_eq!(r.net.to_string(), "2001:db8::1/128");
        let r = Rule::parse("1.2.3.4:22", Action::Deny).unwrap();
        assert_eq!(r.net.to_string(), "1.2.3.4/32");
        let r = Rule::parse("2001:db8::1", Action::Deny).unwrap();
        assert!(r.ports.is_none());
        assert!(Rule::parse("10.0.0.0/33", Action::Deny).is_err());
        assert!(Rule::parse("nonsense", Action::Deny).is_err());
        assert!(Rule::parse("10.0.0.0/8:0", Action::Deny).is_err());
    }
}
