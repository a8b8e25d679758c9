//! The enclave's interfaces and routing table over rtnetlink.
//!
//! - [`configure`]: `lo` up, and the TAP device's address, MTU, link state and the default route
//!   through the stack, once at start.
//! - [`Routes`]: for each ingress stream, whether the enclave kernel routes the client's address
//!   back out of the TAP.
//!
//! # Whose address an ingress connection comes from
//!
//! The client address in an ingress header is an assertion by the untrusted host. The stack may
//! use it as the source of the connection it injects only if the enclave kernel would send the
//! replies back out of the TAP, to the stack. Otherwise the server's SYN-ACK leaves by another
//! interface (a Docker bridge whose subnet overlaps the VPC, say), or is delivered locally, and the
//! connection hangs until it times out; or the host spoofs a peer the enclave trusts. So
//! [`Routes::check`] asks the kernel, as `ip route get ADDR` does: one `RTM_GETROUTE` for that
//! destination (never a dump). Only a unicast route whose output interface is the TAP counts.
//! Anything else — loopback, an address of any enclave interface (a `local` route), a subnet
//! routed elsewhere, broadcast, multicast, unspecified, IPv6 while the TAP is IPv4-only, the TAP's
//! own subnet, no route, a failed or slow lookup — is sourced from the gateway. The first cases
//! are settled by [`prefilter`] without asking; the kernel's answer is judged by [`judge`]. Both
//! are sans-IO.
//!
//! The lookup runs in the ingress admission task, never on the stack task, over one rtnetlink
//! connection for the daemon's life, and each is bounded by [`LOOKUP_TIMEOUT`].

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Mutex;
use std::time::Duration;

use futures::TryStreamExt;
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteType};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use tokio::time::Instant;
use tracing::{debug, info_span, warn, Instrument};

/// Why the interfaces could not be configured.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The netlink socket could not be opened.
    #[error("cannot open a netlink socket: {0}")]
    Open(#[source] std::io::Error),
    /// A request failed.
    #[error("{what}: {source}")]
    Request {
        /// What was being done.
        what: String,
        /// The kernel's answer.
        #[source]
        source: rtnetlink::Error,
    },
    /// The named link does not exist.
    #[error("no interface named {0}")]
    NoLink(String),
}

/// What to configure on the TAP.
#[derive(Debug, Clone)]
pub struct TapConfig {
    /// Interface name.
    pub name: String,
    /// The enclave kernel's address on it.
    pub address: Ipv4Addr,
    /// Its prefix length.
    pub prefix: u8,
    /// The stack's address, used as the default gateway.
    pub gateway: Ipv4Addr,
    /// Link MTU.
    pub mtu: u32,
}

fn request(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let what = what.into();
    move |source| NetlinkError::Request { what, source }
}

async fn index_of(handle: &Handle, name: &str) -> Result<u32, NetlinkError> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(link)) => Ok(link.header.index),
        Ok(None) => Err(NetlinkError::NoLink(name.into())),
        Err(e) => Err(request(format!("looking up {name}"))(e)),
    }
}

/// Whether an error is the kernel saying "already there" (a restart finds its own config).
fn already_exists(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc::EEXIST)
}

/// Brings `lo` up and configures the TAP. Idempotent.
pub async fn configure(tap: &TapConfig) -> Result<(), NetlinkError> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Open)?;
    let conn_task = tokio::spawn(connection);
    let result = configure_with(&handle, tap).await;
    conn_task.abort();
    result
}

async fn configure_with(handle: &Handle, tap: &TapConfig) -> Result<(), NetlinkError> {
    let lo = index_of(handle, "lo").await?;
    handle
        .link()
        .set(LinkUnspec::new_with_index(lo).up().build())
        .execute()
        .await
        .map_err(request("bringing lo up"))?;

    let index = index_of(handle, &tap.name).await?;
    handle
        .link()
        .set(
            LinkUnspec::new_with_index(index)
                .mtu(tap.mtu)
                .address(crate::stack::KERNEL_MAC.0.to_vec())
                .build(),
        )
        .execute()
        .await
        .map_err(request(format!(
            "setting MTU {} and the MAC on {}",
            tap.mtu, tap.name
        )))?;
    match handle
        .address()
        .add(index, IpAddr::V4(tap.address), tap.prefix)
        .execute()
        .await
    {
        Err(e) if !already_exists(&e) => {
            return Err(request(format!(
                "adding {}/{} to {}",
                tap.address, tap.prefix, tap.name
            ))(e))
        }
        _ => {}
    }
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(request(format!("bringing {} up", tap.name)))?;
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .gateway(tap.gateway)
        .output_interface(index)
        .build();
    handle
        .route()
        .add(route)
        .replace()
        .execute()
        .await
        .map_err(request(format!(
            "adding the default route via {}",
            tap.gateway
        )))?;
    Ok(())
}

/// How long one route lookup may take before the client is sourced from the gateway.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(1);

/// The least time between two warnings that lookups are failing.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// How the enclave kernel routes an ingress client's address, and so whether the client can be
/// the source of the connection the stack injects. Only [`ClientRoute::Tap`] can.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientRoute {
    /// A unicast route out of the TAP: replies reach the stack, so the client can be the source.
    Tap,
    /// IPv6, and not IPv4-mapped: the TAP carries only IPv4.
    NotIpv4,
    /// Loopback, unspecified, broadcast or multicast: never a peer on any link.
    Special,
    /// On the TAP's own subnet, where only the enclave kernel and the stack's gateway live.
    TapSubnet,
    /// Routed some other way: a `local` route (an address of an enclave interface), a route out of
    /// another interface (a Docker bridge), broadcast, multicast.
    Elsewhere {
        /// The route's type.
        kind: RouteType,
        /// Its output interface, if the answer named one.
        oif: Option<u32>,
    },
    /// The kernel has no usable route: unreachable, prohibited or a black hole.
    NoRoute,
    /// The lookup failed or timed out.
    Unknown,
}

impl ClientRoute {
    /// Whether the client can be the source of the injected connection.
    pub fn is_tap(self) -> bool {
        self == ClientRoute::Tap
    }
}

/// Settles what needs no kernel: returns the IPv4 address to look up, or why the client cannot
/// be a source. `tap` is the enclave kernel's TAP address and prefix.
pub fn prefilter(client: IpAddr, tap: (Ipv4Addr, u8)) -> Result<Ipv4Addr, ClientRoute> {
    let ip = match client {
        IpAddr::V4(v4) => v4,
        IpAddr::V6(v6) => v6.to_ipv4_mapped().ok_or(ClientRoute::NotIpv4)?,
    };
    if ip.is_loopback() || ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() {
        return Err(ClientRoute::Special);
    }
    if crate::config::on_subnet(ip, tap.0, tap.1) {
        return Err(ClientRoute::TapSubnet);
    }
    Ok(ip)
}

/// Judges the kernel's answer to `ip route get`: only a unicast route out of interface
/// `tap_index` counts.
pub fn judge(answer: &RouteMessage, tap_index: u32) -> ClientRoute {
    let oif = answer.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(index) => Some(*index),
        _ => None,
    });
    let kind = answer.header.kind;
    if kind == RouteType::Unicast && oif == Some(tap_index) {
        ClientRoute::Tap
    } else {
        ClientRoute::Elsewhere { kind, oif }
    }
}

/// The `RTM_GETROUTE` request for one IPv4 destination, as `ip route get ADDR` sends it. The
/// destination attribute makes it a lookup rather than a dump; every other header field is zero,
/// which is also what the kernel's strict checking demands.
pub fn route_get(ip: Ipv4Addr) -> RouteMessage {
    let mut message = RouteMessage::default();
    message.header.address_family = AddressFamily::Inet;
    message.header.destination_prefix_length = 32;
    message
        .attributes
        .push(RouteAttribute::Destination(RouteAddress::Inet(ip)));
    message
}

/// The enclave kernel's routing table, asked about ingress clients over one long-lived rtnetlink
/// connection. Shared by every admission task.
#[derive(Debug)]
pub struct Routes {
    /// The connection's handle; replaced if the connection dies.
    handle: Mutex<Handle>,
    /// The TAP's interface index.
    tap_index: u32,
    /// The enclave kernel's TAP address and prefix.
    tap: (Ipv4Addr, u8),
    /// When lookup failures were last warned about, and how many there have been since.
    warned: Mutex<(Option<Instant>, u64)>,
}

impl Routes {
    /// Opens the connection and finds the TAP named `tap_name`, whose enclave address and prefix
    /// are `tap`. Call after [`configure`].
    pub async fn open(tap_name: &str, tap: (Ipv4Addr, u8)) -> Result<Routes, NetlinkError> {
        let handle = connect()?;
        let tap_index = index_of(&handle, tap_name).await?;
        Ok(Routes {
            handle: Mutex::new(handle),
            tap_index,
            tap,
            warned: Mutex::new((None, 0)),
        })
    }

    /// Whether `client` can be the source of an ingress connection, and if not, why. Never
    /// takes much longer than [`LOOKUP_TIMEOUT`].
    pub async fn check(&self, client: IpAddr) -> ClientRoute {
        let ip = match prefilter(client, self.tap) {
            Ok(ip) => ip,
            Err(route) => return route,
        };
        let handle = self
            .handle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let lookup = async {
            let mut answers = handle.route().get(route_get(ip)).execute();
            answers.try_next().await
        };
        match tokio::time::timeout(LOOKUP_TIMEOUT, lookup).await {
            Ok(Ok(Some(answer))) => judge(&answer, self.tap_index),
            // The kernel's own answer for unreachable, prohibit and blackhole routes.
            Ok(Err(rtnetlink::Error::NetlinkError(e))) => {
                debug!(%ip, "no route: {e}");
                ClientRoute::NoRoute
            }
            Ok(Err(rtnetlink::Error::RequestFailed)) => {
                self.failed(ip, "the rtnetlink connection is gone; reopening it");
                self.reconnect();
                ClientRoute::Unknown
            }
            Ok(Err(e)) => {
                self.failed(ip, &e.to_string());
                ClientRoute::Unknown
            }
            Ok(Ok(None)) => {
                self.failed(ip, "no answer");
                ClientRoute::Unknown
            }
            Err(_) => {
                self.failed(ip, "timed out");
                ClientRoute::Unknown
            }
        }
    }

    /// Logs a failed lookup: at debug each time, since a flood of streams can cause them, and as
    /// a warning at most once per [`WARN_EVERY`], since every client then loses its address.
    fn failed(&self, ip: Ipv4Addr, why: &str) {
        debug!(%ip, "route lookup failed, sourcing from the gateway: {why}");
        let mut guard = self.warned.lock().unwrap_or_else(|e| e.into_inner());
        let (last, failures) = &mut *guard;
        *failures += 1;
        let now = Instant::now();
        if last.is_none_or(|at| now.duration_since(at) >= WARN_EVERY) {
            warn!(
                failures = *failures,
                "route lookups for ingress clients are failing ({why}); their connections come \
                 from the gateway address"
            );
            *last = Some(now);
            *failures = 0;
        }
    }

    fn reconnect(&self) {
        match connect() {
            Ok(handle) => *self.handle.lock().unwrap_or_else(|e| e.into_inner()) = handle,
            Err(e) => debug!("cannot reopen the rtnetlink connection: {e}"),
        }
    }
}

/// Opens an rtnetlink connection and spawns its task, which ends once every handle is dropped.
fn connect() -> Result<Handle, NetlinkError> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Open)?;
    tokio::spawn(connection.instrument(info_span!("rtnetlink")));
    Ok(handle)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use rtnetlink::packet_core::Emitable;

    use super::*;

    const TAP: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 240, 0, 2), 30);
    const TAP_INDEX: u32 = 7;

    fn v4(s: &str) -> IpAddr {
        IpAddr::V4(s.parse().expect("test address"))
    }

    #[test]
    fn prefilter_passes_ordinary_clients_to_the_kernel() {
        for ip in ["203.0.113.7", "172.17.0.5", "192.168.1.1", "10.240.0.4"] {
            assert_eq!(prefilter(v4(ip), TAP), Ok(ip.parse().expect("v4")), "{ip}");
        }
        let mapped = IpAddr::V6(Ipv4Addr::new(203, 0, 113, 7).to_ipv6_mapped());
        assert_eq!(prefilter(mapped, TAP), Ok(Ipv4Addr::new(203, 0, 113, 7)));
    }

    #[test]
    fn prefilter_settles_what_can_never_be_a_source() {
        let cases = [
            ("127.0.0.1", ClientRoute::Special),
            ("127.9.9.9", ClientRoute::Special),
            ("0.0.0.0", ClientRoute::Special),
            ("255.255.255.255", ClientRoute::Special),
            ("224.0.0.1", ClientRoute::Special),
            ("239.1.2.3", ClientRoute::Special),
            ("10.240.0.0", ClientRoute::TapSubnet),
            ("10.240.0.1", ClientRoute::TapSubnet),
            ("10.240.0.2", ClientRoute::TapSubnet),
            ("10.240.0.3", ClientRoute::TapSubnet),
        ];
        for (ip, want) in cases {
            assert_eq!(prefilter(v4(ip), TAP), Err(want), "{ip}");
        }
        for ip in [
            Ipv6Addr::LOCALHOST,
            Ipv6Addr::UNSPECIFIED,
            "2001:db8::1".parse().expect("v6"),
        ] {
            assert_eq!(
                prefilter(IpAddr::V6(ip), TAP),
                Err(ClientRoute::NotIpv4),
                "{ip}"
            );
        }
        let mapped_loopback = IpAddr::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped());
        assert_eq!(prefilter(mapped_loopback, TAP), Err(ClientRoute::Special));
    }

    fn answer(kind: RouteType, oif: Option<u32>) -> RouteMessage {
        let mut m = RouteMessage::default();
        m.header.address_family = AddressFamily::Inet;
        m.header.destination_prefix_length = 32;
        m.header.kind = kind;
        m.attributes
            .push(RouteAttribute::Destination(RouteAddress::Inet(
                Ipv4Addr::new(203, 0, 113, 7),
            )));
        if let Some(index) = oif {
            m.attributes.push(RouteAttribute::Oif(index));
        }
        m
    }

    #[test]
    fn only_a_unicast_route_out_of_the_tap_counts() {
        assert_eq!(
            judge(&answer(RouteType::Unicast, Some(TAP_INDEX)), TAP_INDEX),
            ClientRoute::Tap
        );
        let elsewhere = [
            // A Docker bridge whose subnet covers the client.
            (RouteType::Unicast, Some(4)),
            // An address of an enclave interface: delivered locally, by `lo`.
            (RouteType::Local, Some(1)),
            (RouteType::Broadcast, Some(TAP_INDEX)),
            (RouteType::Multicast, Some(TAP_INDEX)),
            (RouteType::Anycast, Some(TAP_INDEX)),
            (RouteType::Unicast, None),
            (RouteType::Unspec, Some(TAP_INDEX)),
        ];
        for (kind, oif) in elsewhere {
            let got = judge(&answer(kind, oif), TAP_INDEX);
            assert_eq!(
                got,
                ClientRoute::Elsewhere { kind, oif },
                "{kind:?} {oif:?}"
            );
            assert!(!got.is_tap());
        }
    }

    #[test]
    fn the_request_is_one_lookup_as_ip_route_get_sends_it() {
        let message = route_get(Ipv4Addr::new(172, 17, 0, 5));
        let mut bytes = vec![0u8; message.buffer_len()];
        message.emit(&mut bytes);
        // rtmsg: family AF_INET, dst_len 32, then zeros (src_len, tos, table, protocol, scope,
        // type, flags); then RTA_DST (1), 8 bytes long, holding the address.
        let want = [
            2, 32, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, //
            8, 0, 1, 0, 172, 17, 0, 5,
        ];
        assert_eq!(bytes, want);
    }
}
