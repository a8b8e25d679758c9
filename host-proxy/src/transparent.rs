//! `--publish-transparent [IFACE:]RANGE[,RANGE...]`: every TCP connection arriving on those ports
//! goes to the same port in the enclave, with no listener per port.
//!
//! host-proxy installs one nftables table of its own, [`TABLE`] (family `ip`), whose `prerouting`
//! NAT chain redirects the ranges (arriving on `IFACE`, or on any interface) to one listener,
//! `--transparent-port`; each accepted connection's original port is read back with
//! `SO_ORIGINAL_DST`. The table is written through nftables' JSON API (the `nftables` crate runs
//! `nft -j`), in one transaction that first replaces a table of that name left by a crash. On exit
//! the table is deleted. No other table is read, changed or flushed: Docker's and firewalld's
//! rules stay exactly as they were. Ports outside the ranges (22, say) stay the parent's own.
//! A reload replaces the table (one transaction again) and the port-to-enclave routes; the
//! listener's port stays. IPv4 only, as the enclave is.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::{Arc, PoisonError, RwLock};

use common::ports::PortSet;
use nftables::batch::Batch;
use nftables::expr::{
    Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Range, SetItem,
};
use nftables::schema::{Chain, NfListObject, Rule, Table};
use nftables::stmt::{Match, Operator, Statement, NAT};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::{Shared, StartError};

/// host-proxy's own nftables table.
pub const TABLE: &str = "enclave_net_host_proxy";

/// One `--publish-transparent` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transparent {
    /// Only connections arriving on this interface (default: any).
    pub iface: Option<String>,
    /// The ports.
    pub ports: PortSet,
    /// The value as given, for messages.
    pub spec: String,
}

impl FromStr for Transparent {
    type Err = String;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let (iface, ports) = match spec.split_once(':') {
            Some((iface, ports)) => (Some(iface), ports),
            None => (None, spec),
        };
        if let Some(i) = iface {
            // An interface name as the kernel allows it (IFNAMSIZ - 1 bytes, no '/' or spaces).
            if i.is_empty() || i.len() > 15 || i.contains(['/', ' ', '"', ':']) {
                return Err(format!("{spec:?}: {i:?} is not an interface name"));
            }
        }
        let ports = ports
            .parse::<PortSet>()
            .map_err(|e| format!("{spec:?}: {e}"))?;
        Ok(Transparent {
            iface: iface.map(str::to_string),
            ports,
            spec: spec.to_string(),
        })
    }
}

impl std::fmt::Display for Transparent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.spec)
    }
}

fn table() -> NfListObject<'static> {
    NfListObject::Table(Table {
        family: NfFamily::IP,
        name: Cow::Borrowed(TABLE),
        ..Table::default()
    })
}

/// The transaction that (re)creates the table: the ranges of `specs` redirected to `port`.
pub fn ruleset(specs: &[Transparent], port: u16) -> nftables::schema::Nftables<'static> {
    let mut batch = Batch::new();
    // Adding first makes the delete valid whether or not a stale table is there.
    batch.add(table());
    batch.delete(table());
    batch.add(table());
    batch.add(NfListObject::Chain(Chain {
        family: NfFamily::IP,
        table: Cow::Borrowed(TABLE),
        name: Cow::Borrowed("prerouting"),
        _type: Some(NfChainType::NAT),
        hook: Some(NfHook::Prerouting),
        // dstnat: where Docker's own DNAT sits too.
        prio: Some(-100),
        policy: Some(NfChainPolicy::Accept),
        ..Chain::default()
    }));
    for spec in specs {
        let mut expr = Vec::new();
        if let Some(iface) = &spec.iface {
            expr.push(Statement::Match(Match {
                left: Expression::Named(NamedExpression::Meta(Meta {
                    key: MetaKey::Iifname,
                })),
                right: Expression::String(Cow::Owned(iface.clone())),
                op: Operator::EQ,
            }));
        }
        let items = spec
            .ports
            .ranges()
            .iter()
            .map(|r| {
                SetItem::Element(if r.start() == r.end() {
                    Expression::Number(u32::from(*r.start()))
                } else {
                    Expression::Range(Box::new(Range {
                        range: [
                            Expression::Number(u32::from(*r.start())),
                            Expression::Number(u32::from(*r.end())),
                        ],
                    }))
                })
            })
            .collect();
        expr.push(Statement::Match(Match {
            left: Expression::Named(NamedExpression::Payload(Payload::PayloadField(
                PayloadField {
                    protocol: Cow::Borrowed("tcp"),
                    field: Cow::Borrowed("dport"),
                },
            ))),
            right: Expression::Named(NamedExpression::Set(items)),
            op: Operator::EQ,
        }));
        expr.push(Statement::Redirect(Some(NAT {
            addr: None,
            family: None,
            port: Some(Expression::Number(u32::from(port))),
            flags: None,
        })));
        batch.add(NfListObject::Rule(Rule {
            family: NfFamily::IP,
            table: Cow::Borrowed(TABLE),
            chain: Cow::Borrowed("prerouting"),
            expr: Cow::Owned(expr),
            comment: Some(Cow::Owned(format!(
                "host-proxy --publish-transparent {spec}"
            ))),
            ..Rule::default()
        }));
    }
    batch.to_nftables()
}

/// Installs (or replaces) the table.
pub fn install(specs: &[Transparent], port: u16) -> Result<(), String> {
    nftables::helper::apply_ruleset(&ruleset(specs, port)).map_err(|e| e.to_string())
}

/// Deletes the table, if it is there.
pub fn remove() -> Result<(), String> {
    let mut batch = Batch::new();
    batch.add(table());
    batch.delete(table());
    nftables::helper::apply_ruleset(&batch.to_nftables()).map_err(|e| e.to_string())
}

/// Which enclave each transparent port goes to: the ranges of each, in order. Read on every
/// redirected connection, swapped whole on reload.
pub type Routes = Arc<RwLock<Vec<(Transparent, Arc<Shared>)>>>;

/// The transparent ranges in force: the table, the one listener, and where each port goes.
#[derive(Debug, Default)]
pub struct Served {
    routes: Routes,
    listener: Option<JoinHandle<()>>,
    /// The ranges the table holds now.
    installed: Vec<Transparent>,
}

impl Served {
    /// Serves exactly the ranges of each enclave of `enclaves` (the enclave and its ranges),
    /// redirected to `port`: binds the listener if it is not yet bound, then (re)installs the
    /// table in one transaction; without ranges, removes both. On error nothing in force changed
    /// but the listener, which may have been bound.
    pub async fn apply(
        &mut self,
        enclaves: &[(Arc<Shared>, Vec<Transparent>)],
        port: u16,
    ) -> Result<(), StartError> {
        let ranges: Vec<Transparent> = enclaves.iter().flat_map(|(_, r)| r.clone()).collect();
        if ranges.is_empty() {
            self.stop();
            return Ok(());
        }
        if self.listener.is_none() {
            // The listener first, so no redirected connection finds the port closed.
            let addr = SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, port));
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Publish { addr, source })?;
            let target = crate::ingress::Target::Original(self.routes.clone());
            self.listener = Some(tokio::spawn(crate::ingress::serve(listener, target)));
        }
        if ranges != self.installed {
            install(&ranges, port).map_err(StartError::Nftables)?;
            info!(
                table = TABLE,
                ranges = ?ranges.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "nftables table installed"
            );
        }
        let routes = enclaves
            .iter()
            .flat_map(|(e, r)| r.iter().map(|t| (t.clone(), e.clone())))
            .collect();
        *self.routes.write().unwrap_or_else(PoisonError::into_inner) = routes;
        self.installed = ranges;
        Ok(())
    }

    /// Removes the table, if one is installed, and stops the listener.
    pub fn stop(&mut self) {
        if !self.installed.is_empty() {
            match remove() {
                Ok(()) => info!(table = TABLE, "nftables table removed"),
                Err(e) => warn!(table = TABLE, "cannot remove the nftables table: {e}"),
            }
            self.installed.clear();
        }
        if let Some(task) = self.listener.take() {
            task.abort();
        }
        self.routes
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}

/// The port a redirected client dialled and the enclave whose ranges hold it, if any.
pub fn route(routes: &Routes, port: u16) -> Option<Arc<Shared>> {
    let routes = routes.read().unwrap_or_else(PoisonError::into_inner);
    routes
        .iter()
        .find(|(t, _)| t.ports.contains(port))
        .map(|(_, e)| e.clone())
}

/// The enclave that counts redirected clients no range takes: the first with ranges.
pub fn fallback(routes: &Routes) -> Option<Arc<Shared>> {
    let routes = routes.read().unwrap_or_else(PoisonError::into_inner);
    routes.first().map(|(_, e)| e.clone())
}

/// The address a redirected connection was sent to, before nftables changed it.
pub fn original_dst(tcp: &tokio::net::TcpStream) -> std::io::Result<SocketAddr> {
    let sin = nix::sys::socket::getsockopt(tcp, nix::sys::socket::sockopt::OriginalDst)?;
    Ok(SocketAddr::from((
        std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
        u16::from_be(sin.sin_port),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_the_ruleset_says_what_it_does() {
        let t: Transparent = "eth0:80,443,1024-61439".parse().unwrap();
        assert_eq!(t.iface.as_deref(), Some("eth0"));
        assert!(t.ports.contains(443) && t.ports.contains(61439) && !t.ports.contains(22));
        let any: Transparent = "8000-8100".parse().unwrap();
        assert_eq!(any.iface, None);
        for bad in [
            "eth0:",
            "eth0:0",
            "a/b:80",
            "eth0:90-80",
            ":80",
            "averyveryverylongname:80",
        ] {
            assert!(bad.parse::<Transparent>().is_err(), "{bad}");
        }
        let json = serde_json::to_string(&ruleset(&[t, any], 61440)).unwrap();
        for want in [
            "\"name\":\"enclave_net_host_proxy\"",
            "\"hook\":\"prerouting\"",
            "\"iifname\"",
            "\"eth0\"",
            "\"range\":[1024,61439]",
            "\"redirect\":{\"port\":61440}",
        ] {
            assert!(json.contains(want), "{want} missing from {json}");
        }
        assert_eq!(
            json.matches("\"delete\"").count(),
            1,
            "the stale table goes first"
        );
    }
}
