//! Direct node routes (the seed's autoDirectNodeRoutes): for every block another node holds, a
//! kernel route to it via that node's IP, installed over netlink. Routes allot installs carry
//! their own protocol number, so the agent finds and removes exactly its own.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::Duration;

use allot_store::{ClusterView, Store, StoreEvent};
use allot_wire::RouteFailure;
use futures_util::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol};
use rtnetlink::{Handle, RouteMessageBuilder};
use tokio::sync::watch;

use crate::Node;

/// `proto 0xa1` in `ip route`: routes allot installed.
pub const ROUTE_PROTOCOL: u8 = 0xa1;

/// The routes this node should have: other nodes' blocks via their IPs, with the node's name.
pub fn wanted(view: &ClusterView, me: &str) -> BTreeMap<IpNet, (IpAddr, String)> {
    view.blocks
        .iter()
        .filter(|(_, node)| node.as_str() != me)
        .filter_map(|((_, cidr), node)| {
            let via = view.nodes.get(node)?.ip?;
            (via.is_ipv4() == cidr.addr().is_ipv4()).then(|| (*cidr, (via, node.clone())))
        })
        .collect()
}

fn ours(msg: &RouteMessage) -> Option<(IpNet, Option<IpAddr>)> {
    if msg.header.protocol != RouteProtocol::Other(ROUTE_PROTOCOL) || msg.header.table != RouteHeader::RT_TABLE_MAIN {
        return None;
    }
    let mut dst = None;
    let mut gw = None;
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Destination(RouteAddress::Inet(a)) => dst = Some(IpAddr::V4(*a)),
            RouteAttribute::Destination(RouteAddress::Inet6(a)) => dst = Some(IpAddr::V6(*a)),
            RouteAttribute::Gateway(RouteAddress::Inet(a)) => gw = Some(IpAddr::V4(*a)),
            RouteAttribute::Gateway(RouteAddress::Inet6(a)) => gw = Some(IpAddr::V6(*a)),
            _ => {}
        }
    }
    Some((IpNet::new(dst?, msg.header.destination_prefix_length).ok()?, gw))
}

async fn installed(handle: &Handle) -> Result<Vec<(IpNet, Option<IpAddr>, RouteMessage)>, rtnetlink::Error> {
    let mut out = Vec::new();
    for filter in [RouteMessageBuilder::<Ipv4Addr>::new().build(), RouteMessageBuilder::<Ipv6Addr>::new().build()] {
        let mut routes = handle.route().get(filter).execute();
        while let Some(msg) = routes.try_next().await? {
            if let Some((dst, gw)) = ours(&msg) {
                out.push((dst, gw, msg));
            }
        }
    }
    Ok(out)
}

fn route_message(dst: IpNet, via: IpAddr) -> Option<RouteMessage> {
    let proto = RouteProtocol::Other(ROUTE_PROTOCOL);
    match (dst, via) {
        (IpNet::V4(d), IpAddr::V4(g)) => Some(
            RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(d.network(), d.prefix_len()).gateway(g).protocol(proto).build(),
        ),
        (IpNet::V6(d), IpAddr::V6(g)) => Some(
            RouteMessageBuilder::<Ipv6Addr>::new().destination_prefix(d.network(), d.prefix_len()).gateway(g).protocol(proto).build(),
        ),
        _ => None,
    }
}

/// What one sync did.
#[derive(Debug, Default)]
pub struct SyncReport {
    pub added: usize,
    pub removed: usize,
    pub failures: Vec<RouteFailure>,
}

/// Makes the kernel's allot routes equal to `want`, route by route: one that fails is reported
/// and the others still go in. Only routes with allot's protocol are changed or removed; a
/// route someone else installed for the same destination is left alone (added without
/// `replace`, so the kernel refuses to overwrite it) and reported.
pub async fn sync(handle: &Handle, want: &BTreeMap<IpNet, (IpAddr, String)>) -> Result<SyncReport, rtnetlink::Error> {
    let have = installed(handle).await?;
    let mut report = SyncReport::default();
    let mut stuck = Vec::new();
    for (dst, gw, msg) in &have {
        if want.get(dst).map(|(via, _)| via) != gw.as_ref() {
            match handle.route().del(msg.clone()).execute().await {
                Ok(()) => report.removed += 1,
                Err(e) => {
                    tracing::warn!(%dst, error = %e, "removing a stale direct route failed; retrying");
                    stuck.push((*dst, e.to_string()));
                }
            }
        }
    }
    for (dst, (via, node)) in want {
        if have.iter().any(|(d, g, _)| d == dst && g.as_ref() == Some(via)) {
            continue;
        }
        // allot's own old route is still there: say so, rather than blame someone else's.
        if let Some((_, e)) = stuck.iter().find(|(d, _)| d == dst) {
            let error = format!("allot's previous route to {dst} could not be removed: {e}");
            report.failures.push(RouteFailure { node: node.clone(), cidr: *dst, via: *via, error });
            continue;
        }
        let Some(msg) = route_message(*dst, *via) else { continue };
        match handle.route().add(msg).execute().await {
            Ok(()) => report.added += 1,
            Err(e) => {
                let error = match &e {
                    rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc::EEXIST => format!(
                        "a route to {dst} that allot does not own is in the way (see `ip route show {dst}`); allot leaves it alone"
                    ),
                    _ => e.to_string(),
                };
                report.failures.push(RouteFailure { node: node.clone(), cidr: *dst, via: *via, error });
            }
        }
    }
    Ok(report)
}

/// Follows the store and keeps the routes in step until `stop` turns true; failures are shown
/// in `allot status`. Routes stay when the agent stops: pods elsewhere still need them while
/// it restarts.
pub async fn run<S: Store>(store: Arc<S>, node: Arc<Node<S>>, mut stop: watch::Receiver<bool>) {
    let me = node.cfg.node.clone();
    let (connection, handle, _) = match rtnetlink::new_connection() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "opening netlink failed; direct routes are off");
            return;
        }
    };
    tokio::spawn(connection);
    // A view of every block and node, read once and kept by the store's events.
    let mut events = store.events();
    let mut view: Option<ClusterView> = None;
    loop {
        if view.is_none() {
            match store.snapshot().await {
                Ok(s) => view = Some(ClusterView::new(s, None)),
                // With the store away, keep the routes as they are.
                Err(e) => tracing::warn!(error = %e, "reading blocks for direct routes failed; retrying"),
            }
        }
        if let Some(v) = &view {
            let want = wanted(v, &me);
            match sync(&handle, &want).await {
                Ok(report) => {
                    if report.added + report.removed > 0 {
                        tracing::info!(added = report.added, removed = report.removed, routes = want.len(), "direct node routes updated");
                    }
                    for f in &report.failures {
                        tracing::warn!(node = %f.node, cidr = %f.cidr, via = %f.via, error = %f.error, "direct node route not installed");
                    }
                    *node.route_failures.lock().unwrap_or_else(|p| p.into_inner()) = report.failures;
                }
                Err(e) => tracing::warn!(error = %e, "reading the kernel's routes failed; retrying"),
            }
        }
        let wait = if view.is_some() { Duration::from_secs(10) } else { Duration::from_secs(1) };
        let mut next = tokio::select! {
            e = events.recv() => Some(e),
            _ = tokio::time::sleep(wait) => None,
            _ = stop.changed() => return,
        };
        // Take in the whole burst before syncing.
        while let Some(e) = next {
            use tokio::sync::broadcast::error::{RecvError, TryRecvError};
            match e {
                Ok(StoreEvent::Changes(c)) => {
                    if let Some(v) = view.as_mut() {
                        v.apply_all(&c);
                    }
                }
                Ok(StoreEvent::Resync) | Err(RecvError::Lagged(_)) => view = None,
                Err(RecvError::Closed) => return,
            }
            next = match events.try_recv() {
                Ok(e) => Some(Ok(e)),
                Err(TryRecvError::Lagged(n)) => Some(Err(RecvError::Lagged(n))),
                Err(TryRecvError::Closed) => Some(Err(RecvError::Closed)),
                Err(TryRecvError::Empty) => None,
            };
        }
    }
}
