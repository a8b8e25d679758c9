//! The egress policy: which destinations the enclave may reach.
//!
//! Sans-IO: a [`Policy`] is a list of [`Rule`]s and [`Policy::check`] is a pure function of the
//! rules and the destination. The most specific matching rule wins: a longer prefix beats a
//! shorter one; at equal prefix, a rule naming fewer ports beats one naming more; then an
//! operator's rule beats a built-in one (so an operator can re-open exactly what a default
//! closes); at a full tie, deny beats allow.
//!
//! The defaults deny the instance metadata service (169.254.0.0/16 and AWS's IPv6 IMDS address
//! `fd00:ec2::254`), loopback (127.0.0.0/8, `::1`), the "this host" addresses (0.0.0.0/8, `::`)
//! that Linux also routes to the parent itself, and every address on the parent's own interfaces
//! (given by [`Policy::set_local_addrs`], refreshed at run time because DHCP can change them).
//! Everything else is allowed. `--allow 169.254.169.254/32:80` re-opens one port of IMDS.
//!
//! # One address space
//!
//! A dual-stack socket reaches IPv4 address `a.b.c.d` as `::ffff:a.b.c.d`, so the two spellings
//! must be one destination to the policy, or a rule for one is bypassed through the other. Rules
//! and destinations inside `::ffff:0:0/96` are stored as their IPv4 form. For ranking, an IPv4
//! prefix `/p` counts as `/(96 + p)`, its length in that mapped space; and an IPv6 rule shorter
//! than /96 that covers `::ffff:0:0/96` (such as `::/0`) covers every IPv4 address, as it
//! would on the wire.

use std::cmp::Reverse;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::{PoisonError, RwLock};

use common::ports::{PortError, PortSet};
use ipnet::{IpNet, Ipv4Net};

/// An IP network. One inside `::ffff:0:0/96` is held as the IPv4 network it maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr(IpNet);

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
    /// Builds a CIDR, checking the prefix against the family. Host bits are cleared.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Cidr> {
        let net = IpNet::new(addr, prefix).ok()?.trunc();
        Some(Cidr(unmap(net)))
    }

    /// The network holding only `ip`.
    pub fn host(ip: IpAddr) -> Cidr {
        Cidr(IpNet::from(canonical(ip)))
    }

    /// Whether `ip` is inside this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.0, canonical(ip)) {
            (IpNet::V4(net), IpAddr::V4(ip)) => net.contains(&ip),
            (IpNet::V6(net), IpAddr::V6(ip)) => net.contains(&ip),
            // Only an IPv6 network shorter than /96 gets here with a chance: it covers all of
            // ::ffff:0:0/96 or none of it (longer ones inside it were stored as IPv4).
            (IpNet::V6(net), IpAddr::V4(ip)) => net.contains(&ip.to_ipv6_mapped()),
            (IpNet::V4(_), IpAddr::V6(_)) => false,
        }
    }

    /// The prefix length in the one 128-bit space where IPv4 is `::ffff:0:0/96`, so that IPv4
    /// and IPv6 rules rank against each other.
    pub fn rank(&self) -> u8 {
        match self.0 {
            IpNet::V4(net) => 96 + net.prefix_len(),
            IpNet::V6(net) => net.prefix_len(),
        }
    }

    /// The network, IPv4 if it lies inside `::ffff:0:0/96`.
    pub fn net(&self) -> IpNet {
        self.0
    }
}

/// A network inside `::ffff:0:0/96`, as the IPv4 network it maps.
fn unmap(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => v6
            .addr()
            .to_ipv4_mapped()
            .and_then(|v4| Ipv4Net::new(v4, v6.prefix_len() - 96).ok())
            .map_or(net, IpNet::V4),
        _ => net,
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
        self.0.fmt(f)
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

/// Where a rule comes from. Ordered so that the operator's rule wins a tie with a default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Origin {
    /// One of host-proxy's defaults, including the parent's own addresses.
    Builtin,
    /// `--allow` or `--deny`.
    Operator,
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
    /// Who made it.
    pub origin: Origin,
}

impl Rule {
    /// Parses an operator's `CIDR[:PORTS]`: `10.0.0.0/8`, `10.0.0.0/8:80,443`, `1.2.3.4:22`,
    /// `2001:db8::/32:443`, `[2001:db8::1]:443` or `[::ffff:10.0.0.1]:80`.
    pub fn parse(s: &str, action: Action) -> Result<Rule, RuleError> {
        let (net, ports) = split_ports(s);
        Ok(Rule {
            net: net.parse()?,
            ports: ports.map(str::parse).transpose()?,
            action,
            origin: Origin::Operator,
        })
    }

    fn builtin_deny(net: Cidr) -> Rule {
        Rule {
            net,
            ports: None,
            action: Action::Deny,
            origin: Origin::Builtin,
        }
    }

    fn matches(&self, dst: SocketAddr) -> bool {
        self.net.contains(dst.ip()) && self.ports.as_ref().is_none_or(|p| p.contains(dst.port()))
    }

    /// Orders rules so that the greatest is the most specific.
    fn specificity(&self) -> (u8, Reverse<u32>, Origin, Action) {
        let ports = self.ports.as_ref().map_or(65535, PortSet::len);
        (self.net.rank(), Reverse(ports), self.origin, self.action)
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

/// The Amazon Time Sync Service, which UDP may reach by default ([`Policy::check_udp`]).
pub const TIME_SYNC: std::net::SocketAddrV4 =
    std::net::SocketAddrV4::new(std::net::Ipv4Addr::new(169, 254, 169, 123), 123);

/// The ordered egress rule set.
#[derive(Debug)]
pub struct Policy {
    /// The fixed defaults and the operator's rules; the operator's are replaced whole on reload.
    rules: RwLock<Vec<Rule>>,
    /// One built-in denial per address of the parent's interfaces. Replaced as a whole by the
    /// refresh task; `check` only takes the read side, which costs an uncontended atomic.
    local: RwLock<Vec<Rule>>,
}

impl Policy {
    /// The built-in denials plus the operator's rules. The parent's own addresses are added by
    /// [`Policy::set_local_addrs`].
    pub fn new(operator: Vec<Rule>) -> Policy {
        Policy {
            rules: RwLock::new(Self::with_defaults(operator)),
            local: RwLock::new(Vec::new()),
        }
    }

    /// Replaces the operator's rules (a reload). Each connection is checked once, when it is
    /// set up: connections already up are not affected.
    pub fn set_operator_rules(&self, operator: Vec<Rule>) {
        *self.rules.write().unwrap_or_else(PoisonError::into_inner) = Self::with_defaults(operator);
    }

    fn with_defaults(operator: Vec<Rule>) -> Vec<Rule> {
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
            .filter_map(|n| n.parse().ok())
            .map(Rule::builtin_deny)
            .collect();
        rules.extend(operator);
        rules
    }

    /// Replaces the parent's own addresses, each denied like loopback unless an operator rule at
    /// least as specific allows it. Returns whether the set changed.
    pub fn set_local_addrs(&self, addrs: impl IntoIterator<Item = IpAddr>) -> bool {
        let mut hosts: Vec<IpAddr> = addrs.into_iter().map(canonical).collect();
        hosts.sort_unstable();
        hosts.dedup();
        let rules: Vec<Rule> = hosts
            .into_iter()
            .map(|ip| Rule::builtin_deny(Cidr::host(ip)))
            .collect();
        let mut local = self.local.write().unwrap_or_else(PoisonError::into_inner);
        if *local == rules {
            return false;
        }
        *local = rules;
        true
    }

    /// The parent's own addresses as last set.
    pub fn local_addrs(&self) -> Vec<IpAddr> {
        let local = self.local.read().unwrap_or_else(PoisonError::into_inner);
        local.iter().map(|r| r.net.net().addr()).collect()
    }

    /// Decides whether the enclave may connect to `dst`.
    pub fn check(&self, dst: SocketAddr) -> Action {
        self.winner(dst).map_or(Action::Allow, |(action, _)| action)
    }

    /// Decides whether the enclave may send UDP to `dst`: as [`Policy::check`], except that the
    /// Amazon Time Sync Service ([`TIME_SYNC`]) is open unless an operator's rule closes it
    /// (enclave clocks drift by seconds a week; chronyd needs it). Nothing else under
    /// 169.254.0.0/16 opens, and TCP to it stays closed.
    pub fn check_udp(&self, dst: SocketAddr) -> Action {
        match self.winner(dst) {
            Some((action, Origin::Operator)) => action,
            _ if canonical(dst.ip()) == IpAddr::V4(*TIME_SYNC.ip())
                && dst.port() == TIME_SYNC.port() =>
            {
                Action::Allow
            }
            winner => winner.map_or(Action::Allow, |(action, _)| action),
        }
    }

    /// The action and origin of the most specific rule matching `dst`.
    fn winner(&self, dst: SocketAddr) -> Option<(Action, Origin)> {
        let local = self.local.read().unwrap_or_else(PoisonError::into_inner);
        let rules = self.rules.read().unwrap_or_else(PoisonError::into_inner);
        rules
            .iter()
            .chain(local.iter())
            .filter(|r| r.matches(dst))
            .max_by_key(|r| r.specificity())
            .map(|r| (r.action, r.origin))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, SocketAddrV4};

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn allow(s: &str) -> Rule {
        Rule::parse(s, Action::Allow).unwrap()
    }

    fn deny(s: &str) -> Rule {
        Rule::parse(s, Action::Deny).unwrap()
    }

    #[test]
    fn udp_reaches_time_sync_by_default_and_nothing_else_there() {
        let p = Policy::new(vec![]);
        assert_eq!(p.check_udp(sa("169.254.169.123:123")), Action::Allow);
        assert_eq!(
            p.check_udp(sa("[::ffff:169.254.169.123]:123")),
            Action::Allow
        );
        assert_eq!(
            p.check(sa("169.254.169.123:123")),
            Action::Deny,
            "TCP stays closed"
        );
        assert_eq!(p.check_udp(sa("169.254.169.123:124")), Action::Deny);
        assert_eq!(p.check_udp(sa("169.254.169.254:123")), Action::Deny);
        assert_eq!(p.check_udp(sa("169.254.169.254:53")), Action::Deny);
        assert_eq!(p.check_udp(sa("10.0.0.1:53")), Action::Allow);
        let closed = Policy::new(vec![Rule::parse("169.254.0.0/16", Action::Deny).unwrap()]);
        assert_eq!(closed.check_udp(sa("169.254.169.123:123")), Action::Deny);
    }

    #[test]
    fn defaults_deny_metadata_and_loopback_only() {
        let p = Policy::new(vec![]);
        assert_eq!(p.check(sa("169.254.169.254:80")), Action::Deny);
        assert_eq!(p.check(sa("127.0.0.1:22")), Action::Deny);
        assert_eq!(p.check(sa("0.0.0.0:22")), Action::Deny);
        assert_eq!(p.check(sa("[::1]:22")), Action::Deny);
        assert_eq!(p.check(sa("[::]:22")), Action::Deny);
        assert_eq!(p.check(sa("[::ffff:127.0.0.1]:22")), Action::Deny);
        assert_eq!(p.check(sa("[::ffff:169.254.169.254]:80")), Action::Deny);
        assert_eq!(p.check(sa("[fd00:ec2::254]:80")), Action::Deny);
        assert_eq!(p.check(sa("93.184.216.34:443")), Action::Allow);
        assert_eq!(p.check(sa("10.1.2.3:443")), Action::Allow);
        assert_eq!(p.check(sa("[2001:db8::1]:443")), Action::Allow);
    }

    #[test]
    fn most_specific_wins() {
        let p = Policy::new(vec![
            deny("10.0.0.0/8"),
            allow("10.1.0.0/16"),
            deny("10.1.2.0/24:22"),
            allow("169.254.169.254/32:80"),
        ]);
        assert_eq!(p.check(sa("10.9.9.9:80")), Action::Deny);
        assert_eq!(p.check(sa("10.1.9.9:80")), Action::Allow);
        assert_eq!(p.check(sa("10.1.2.3:22")), Action::Deny);
        assert_eq!(p.check(sa("10.1.2.3:23")), Action::Allow);
        assert_eq!(p.check(sa("169.254.169.254:80")), Action::Allow);
        assert_eq!(p.check(sa("169.254.169.254:81")), Action::Deny);
        assert_eq!(p.check(sa("169.254.169.253:80")), Action::Deny);
    }

    #[test]
    fn narrower_ports_win_and_deny_breaks_ties() {
        let p = Policy::new(vec![
            deny("10.0.0.0/8:1-1000"),
            allow("10.0.0.0/8:443"),
            allow("10.2.0.0/16"),
            deny("10.2.0.0/16"),
        ]);
        assert_eq!(p.check(sa("10.0.0.1:443")), Action::Allow);
        assert_eq!(p.check(sa("10.0.0.1:80")), Action::Deny);
        assert_eq!(p.check(sa("10.2.0.1:80")), Action::Deny);
    }

    /// The bug this module once had: a mapped rule kept its /128 against an IPv4 address, its
    /// mask came out empty, and `--allow '[::ffff:203.0.113.7]:80'` allowed every IPv4
    /// destination on port 80, IMDS included.
    #[test]
    fn mapped_rule_allows_only_its_address_and_port() {
        let rule = allow("[::ffff:10.72.0.9]:80");
        assert_eq!(rule.net.to_string(), "10.72.0.9/32");
        let open = Policy::new(vec![rule.clone()]);
        assert_eq!(open.check(sa("169.254.169.254:80")), Action::Deny);
        assert_eq!(open.check(sa("[::ffff:169.254.169.254]:80")), Action::Deny);
        assert_eq!(open.check(sa("127.0.0.1:80")), Action::Deny);

        let closed = Policy::new(vec![rule, deny("0.0.0.0/0"), deny("::/0")]);
        assert_eq!(closed.check(sa("10.72.0.9:80")), Action::Allow);
        assert_eq!(closed.check(sa("[::ffff:10.72.0.9]:80")), Action::Allow);
        assert_eq!(closed.check(sa("10.72.0.9:81")), Action::Deny);
        assert_eq!(closed.check(sa("10.72.0.8:80")), Action::Deny);
        assert_eq!(closed.check(sa("203.0.113.7:80")), Action::Deny);
        assert_eq!(closed.check(sa("169.254.169.254:80")), Action::Deny);
        assert_eq!(closed.check(sa("[2001:db8::1]:80")), Action::Deny);
    }

    #[test]
    fn mapped_networks_are_their_ipv4_forms() {
        assert_eq!(deny("::ffff:10.0.0.0/104").net, deny("10.0.0.0/8").net);
        assert_eq!(
            deny("[::ffff:10.0.0.0]/104:22").net.to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(deny("::ffff:0:0/96").net.to_string(), "0.0.0.0/0");
        assert_eq!(deny("::ffff:10.72.0.9").net.to_string(), "10.72.0.9/32");
        let p = Policy::new(vec![deny("0.0.0.0/0"), allow("::ffff:10.0.0.0/104:22")]);
        assert_eq!(p.check(sa("10.1.2.3:22")), Action::Allow);
        assert_eq!(p.check(sa("[::ffff:10.1.2.3]:22")), Action::Allow);
        assert_eq!(p.check(sa("10.1.2.3:23")), Action::Deny);
        assert_eq!(p.check(sa("11.1.2.3:22")), Action::Deny);
        // An IPv4 rule and its mapped spelling tie, and deny wins the tie.
        let p = Policy::new(vec![allow("10.0.0.0/8"), deny("::ffff:10.0.0.0/104")]);
        assert_eq!(p.check(sa("10.1.2.3:80")), Action::Deny);
    }

    /// An IPv6 rule shorter than /96 either covers all of `::ffff:0:0/96`, and so every IPv4
    /// address, or none of it.
    #[test]
    fn wide_ipv6_rules_cover_ipv4_as_mapped() {
        for net in ["::/0", "::/64", "::/80"] {
            let p = Policy::new(vec![deny(net)]);
            assert_eq!(p.check(sa("93.184.216.34:443")), Action::Deny, "{net}");
            assert_eq!(
                p.check(sa("[::ffff:93.184.216.34]:443")),
                Action::Deny,
                "{net}"
            );
        }
        for net in ["::/81", "::/95", "2001:db8::/32", "64:ff9b::/96"] {
            let p = Policy::new(vec![deny(net)]);
            assert_eq!(p.check(sa("93.184.216.34:443")), Action::Allow, "{net}");
        }
        // Ranked in the mapped space, an IPv4 /0 is a /96: more specific than ::/0.
        let p = Policy::new(vec![deny("::/0"), allow("0.0.0.0/0")]);
        assert_eq!(p.check(sa("93.184.216.34:443")), Action::Allow);
        assert_eq!(p.check(sa("[2001:db8::1]:443")), Action::Deny);
        // ...and the defaults, IPv4 prefixes, still beat an allow of all IPv6 space.
        let p = Policy::new(vec![allow("::/0")]);
        assert_eq!(p.check(sa("169.254.169.254:80")), Action::Deny);
        assert_eq!(p.check(sa("127.0.0.1:80")), Action::Deny);
    }

    #[test]
    fn operator_beats_a_default_at_a_tie_only() {
        let p = Policy::new(vec![allow("127.0.0.0/8")]);
        assert_eq!(p.check(sa("127.0.0.1:80")), Action::Allow);
        let p = Policy::new(vec![allow("0.0.0.0/0"), allow("127.0.0.0/7")]);
        assert_eq!(p.check(sa("127.0.0.1:80")), Action::Deny);
        let p = Policy::new(vec![allow("169.254.169.254/32:80")]);
        assert_eq!(p.check(sa("169.254.169.254:80")), Action::Allow);
        assert_eq!(p.check(sa("169.254.169.254:443")), Action::Deny);
    }

    #[test]
    fn parent_addresses_are_denied_and_refreshed() {
        let p = Policy::new(vec![]);
        assert_eq!(p.check(sa("10.0.0.5:80")), Action::Allow);
        let v6: IpAddr = "2001:db8::5".parse().unwrap();
        let v4: IpAddr = "10.0.0.5".parse().unwrap();
        assert!(p.set_local_addrs([v4, v6, v4]));
        assert!(!p.set_local_addrs([v6, v4]), "same set, in any order");
        assert_eq!(p.local_addrs(), vec![v4, v6]);
        assert_eq!(p.check(sa("10.0.0.5:80")), Action::Deny);
        assert_eq!(p.check(sa("[::ffff:10.0.0.5]:80")), Action::Deny);
        assert_eq!(p.check(sa("[2001:db8::5]:443")), Action::Deny);
        assert_eq!(p.check(sa("10.0.0.6:80")), Action::Allow);
        assert_eq!(p.check(sa("[2001:db8::6]:443")), Action::Allow);

        // DHCP moved the parent: the old address is an ordinary destination again.
        assert!(p.set_local_addrs(["10.0.0.7".parse().unwrap()]));
        assert_eq!(p.check(sa("10.0.0.5:80")), Action::Allow);
        assert_eq!(p.check(sa("10.0.0.7:80")), Action::Deny);

        // A mapped interface address is the IPv4 one.
        assert!(p.set_local_addrs(["::ffff:10.0.0.8".parse().unwrap()]));
        assert_eq!(p.check(sa("10.0.0.8:80")), Action::Deny);
    }

    #[test]
    fn operator_allow_reopens_one_parent_address() {
        let p = Policy::new(vec![
            allow("10.0.0.5/32"),
            allow("[2001:db8::5]:443"),
            allow("10.0.0.0/8"),
        ]);
        p.set_local_addrs(["10.0.0.5", "10.0.0.6", "2001:db8::5"].map(|a| a.parse().unwrap()));
        assert_eq!(p.check(sa("10.0.0.5:80")), Action::Allow);
        assert_eq!(
            p.check(sa("10.0.0.6:80")),
            Action::Deny,
            "a wider allow does not"
        );
        assert_eq!(p.check(sa("[2001:db8::5]:443")), Action::Allow);
        assert_eq!(p.check(sa("[2001:db8::5]:80")), Action::Deny);
    }

    #[test]
    fn rule_syntax() {
        let r = allow("2001:db8::/32:443");
        assert_eq!(r.net.to_string(), "2001:db8::/32");
        assert!(r.ports.unwrap().contains(443));
        let r = allow("[2001:db8::1]:80");
        assert_eq!(r.net.to_string(), "2001:db8::1/128");
        let r = deny("1.2.3.4:22");
        assert_eq!(r.net.to_string(), "1.2.3.4/32");
        let r = deny("2001:db8::1");
        assert!(r.ports.is_none());
        assert_eq!(deny("10.1.2.3/8").net.to_string(), "10.0.0.0/8");
        assert!(Rule::parse("10.0.0.0/33", Action::Deny).is_err());
        assert!(Rule::parse("::ffff:10.0.0.0/129", Action::Deny).is_err());
        assert!(Rule::parse("nonsense", Action::Deny).is_err());
        assert!(Rule::parse("10.0.0.0/8:0", Action::Deny).is_err());
    }

    proptest! {
        /// `a/p` and `::ffff:a/(96+p)` decide alike for every destination, however spelled.
        #[test]
        fn mapped_rules_match_their_ipv4_form(
            net in any::<u32>(),
            prefix in 0u8..=32,
            dst in any::<u32>(),
            port in 1u16..,
            action in prop_oneof![Just(Action::Allow), Just(Action::Deny)],
        ) {
            let net = Ipv4Addr::from(net);
            let dst = Ipv4Addr::from(dst);
            let v4 = Rule::parse(&format!("{net}/{prefix}"), action).unwrap();
            let v6 = Rule::parse(&format!("::ffff:{net}/{}", 96 + prefix), action).unwrap();
            prop_assert_eq!(&v4.net, &v6.net);
            let a = Policy::new(vec![v4]);
            let b = Policy::new(vec![v6]);
            let plain = SocketAddr::V4(SocketAddrV4::new(dst, port));
            let mapped = SocketAddr::new(IpAddr::V6(dst.to_ipv6_mapped()), port);
            prop_assert_eq!(a.check(plain), b.check(plain));
            prop_assert_eq!(a.check(plain), a.check(mapped));
            prop_assert_eq!(b.check(plain), b.check(mapped));
        }
    }
}
