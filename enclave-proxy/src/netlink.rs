//! Configuring the enclave's interfaces over rtnetlink: `lo` up, and the TAP device's address,
//! MTU, link state and the default route through the stack.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

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
        .set(LinkUnspec::new_with_index(index).mtu(tap.mtu).build())
        .execute()
        .await
        .map_err(request(format!("setting MTU {} on {}", tap.mtu, tap.name)))?;
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
