//! Adoption: addresses another IPAM handed out on this node (host-local's files, a node's old
//! pod CIDR) become allocations and blocks of this node, so that allot never hands them out
//! while the old CNI's pods live. Adopted allocations are freed when host-local's file is gone
//! (the old plugin's DEL), by CNI GC, or by an allot DEL of the same owner or, once the node
//! switched to allot, of the same container and ifname under allot's network; never earlier.
//!
//! What was adopted from where is kept in `adoptions.json` in the data directory, so the
//! rescans and the pinned pod-CIDR blocks survive a restart; the allocations themselves are in
//! the journal like any other, marked with their source.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use allot_core::{BlockGrant, Family, PoolSpec};
use allot_store::Store;
use allot_wire::{
    AdoptHostLocalRequest, AdoptPodCidrRequest, AdoptResponse, AllocatedIp, Allocation, AllocationSource, Owner,
    PodRef, PoolAllocation,
};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{Node, State, now_unix, write_atomically};
use crate::AgentError;
use crate::hostlocal;
use crate::records::Op;

pub(super) const ADOPTIONS_FILE: &str = "adoptions.json";
/// How often adopted host-local directories are read again (new leases adopted, vanished ones
/// freed). A rescan rather than inotify: it works the same on every filesystem and after the
/// directory is re-created, and two seconds is well below any pod's restart.
pub const RESCAN_EVERY: Duration = Duration::from_secs(2);
/// More blocks than this in one pod CIDR is a mistake (an IPv6 /64 with /120 blocks).
const MAX_POD_CIDR_BLOCKS: usize = 4096;
pub const HOST_LOCAL: &str = "host-local";

/// What `adoptions.json` holds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Adoptions {
    #[serde(default)]
    pub host_local: Vec<HostLocalDir>,
    /// Blocks held for an adopted pod CIDR: never given back while listed.
    #[serde(default)]
    pub pod_cidrs: Vec<PinnedCidr>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostLocalDir {
    pub dir: PathBuf,
    pub network: String,
    #[serde(default)]
    pub pool: Option<String>,
    /// Owners allot released (DEL, GC) while their file still exists: not adopted again. An
    /// entry goes once the file is gone.
    #[serde(default)]
    pub released: BTreeSet<Owner>,
    /// Owners adopted from this directory and still held: only these are freed when their file
    /// is gone here. Another directory of the same name (another dataDir) holds its own. An
    /// owner listed nowhere (adoptions.json of an older agent, a crash before it was saved) is
    /// this directory's if no other directory of the name names it.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub adopted: BTreeSet<Owner>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PinnedCidr {
    pub pool: String,
    pub cidr: IpNet,
    pub blocks: Vec<IpNet>,
}

pub(super) fn read_adoptions(data_dir: &Path) -> Adoptions {
    let path = data_dir.join(ADOPTIONS_FILE);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
            tracing::error!(file = %path.display(), error = %e, "adoptions file unreadable; adopted directories are not rescanned until `allot adopt` runs again");
            Adoptions::default()
        }),
        Err(_) => Adoptions::default(),
    }
}

/// The pools an address may be adopted into, for error messages.
fn describe_pools(pools: &BTreeMap<String, PoolSpec>, only: Option<&str>) -> String {
    let list: Vec<String> = pools
        .iter()
        .filter(|(n, _)| only.is_none_or(|o| o == n.as_str()))
        .map(|(n, spec)| {
            let cidrs: Vec<String> = spec.families().flat_map(|(_, f)| f.cidrs.iter().map(|c| c.to_string())).collect();
            format!("{n} ({})", cidrs.join(", "))
        })
        .collect();
    if list.is_empty() { "none".into() } else { list.join("; ") }
}

/// The pool and block an address belongs to.
fn place(pools: &BTreeMap<String, PoolSpec>, only: Option<&str>, ip: IpAddr) -> Option<(String, IpNet)> {
    let family = Family::of_addr(&ip);
    pools.iter().filter(|(n, _)| only.is_none_or(|o| o == n.as_str())).find_map(|(name, spec)| {
        let f = spec.family(family)?;
        f.cidrs.iter().any(|c| c.contains(&ip)).then(|| (name.clone(), IpNet::new(ip, f.mask_size).expect("mask fits").trunc()))
    })
}

fn grouped(blocks: &BTreeSet<(String, IpNet)>) -> Vec<PoolAllocation> {
    let mut out: Vec<PoolAllocation> = Vec::new();
    for (pool, cidr) in blocks {
        match out.iter_mut().find(|a| a.pool == *pool) {
            Some(a) => a.cidrs.push(*cidr),
            None => out.push(PoolAllocation { pool: pool.clone(), cidrs: vec![*cidr] }),
        }
    }
    out
}

/// An adoption worked out against the node's state, not applied yet.
struct Plan {
    new: Vec<Allocation>,
    unchanged: Vec<Owner>,
    claim: BTreeSet<(String, IpNet)>,
    held: BTreeSet<(String, IpNet)>,
}

impl<S: Store> Node<S> {
    /// Who holds a block that a claim was just refused for. A store that reads grants from a
    /// watched copy (Kubernetes) may not show the winner yet: look again for a moment, so the
    /// refusal can name it.
    async fn holder_of(&self, pool: &str, block: &IpNet) -> Option<BlockGrant> {
        for _ in 0..10 {
            let found = self.store.grants().await.ok().and_then(|gs| gs.into_iter().find(|g| g.pool == pool && g.cidr == *block));
            if found.is_some() {
                return found;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        None
    }

    /// Checks `wanted` against the node's state and the allocator (on a copy): every address in
    /// a pool, none held by another owner or by the node's gateway. Changes nothing.
    fn plan_adoption(
        &self,
        st: &State,
        wanted: &[(Owner, Vec<IpAddr>)],
        pool: Option<&str>,
        source: &AllocationSource,
        extra_blocks: &[(String, IpNet)],
    ) -> Result<Plan, AgentError> {
        if let Some(p) = pool
            && !st.pools.contains_key(p)
        {
            return Err(AgentError::NotFound(format!("pool {p:?} does not exist: create it with `allot pool apply` first; nothing was adopted")));
        }
        let mut plan = Plan { new: Vec::new(), unchanged: Vec::new(), claim: BTreeSet::new(), held: BTreeSet::new() };
        let mut sim = st.alloc.clone();
        let note_block = |plan: &mut Plan, sim: &mut allot_core::node_alloc::NodeAllocator, pool: &str, block: IpNet| {
            let key = (pool.to_string(), block);
            if st.alloc.holds(pool, &block) {
                plan.held.insert(key);
            } else if plan.claim.insert(key) {
                // The gateway is reserved as `add_block` would; a pod holding it is checked below.
                sim.add_block_with(pool, block, false);
            }
        };
        for (pool, block) in extra_blocks {
            note_block(&mut plan, &mut sim, pool, *block);
        }
        // Who holds each address now, to name the owner of a clash.
        let holders: BTreeMap<IpAddr, &Owner> =
            st.owners.values().flat_map(|a| a.ips.iter().map(move |ip| (ip.address.addr(), &a.owner))).collect();
        for (owner, ips) in wanted {
            let mut placed = Vec::new();
            for ip in ips {
                let Some((p, block)) = place(&st.pools, pool, *ip) else {
                    return Err(AgentError::Invalid(format!(
                        "{ip} (of {owner}) lies in no {}: pools are {}; add its CIDR to a pool (`allot pool apply`) or pass the pool that holds it; nothing was adopted",
                        pool.map_or("pool".to_string(), |p| format!("CIDR of pool {p:?}")),
                        describe_pools(&st.pools, None)
                    )));
                };
                placed.push(AllocatedIp { address: IpNet::new(*ip, block.prefix_len()).expect("prefix of a block"), pool: p.clone(), gateway: None });
                note_block(&mut plan, &mut sim, &p, block);
            }
            if let Some(existing) = st.owners.get(owner) {
                let mut have: Vec<IpAddr> = existing.ips.iter().map(|i| i.address.addr()).collect();
                let mut want = ips.clone();
                have.sort();
                want.sort();
                if have == want {
                    plan.unchanged.push(owner.clone());
                    continue;
                }
                return Err(AgentError::Conflict(format!(
                    "{owner} already holds {} on this node, but the adopted source says {}: nothing was adopted",
                    fmt_ips(&have),
                    fmt_ips(&want)
                )));
            }
            for ip in &placed {
                let addr = ip.address.addr();
                if let Some(other) = holders.get(&addr) {
                    return Err(AgentError::Conflict(format!(
                        "{addr} (of {owner}) is already allocated by allot to {other}: two pods have one address; remove one of them, then adopt again; nothing was adopted"
                    )));
                }
                if let Err(e) = sim.mark_used(&ip.pool, addr) {
                    let why = match e {
                        allot_core::node_alloc::MarkError::AlreadyUsed { .. } => {
                            format!("{addr} (of {owner}) is this node's gateway in its block (or listed twice)")
                        }
                        other => other.to_string(),
                    };
                    return Err(AgentError::Conflict(format!("{why}: nothing was adopted")));
                }
            }
            plan.new.push(Allocation {
                owner: owner.clone(),
                netns: String::new(),
                pod: PodRef::default(),
                ips: placed,
                created: now_unix(),
                source: source.clone(),
            });
        }
        Ok(plan)
    }

    /// Adopts `wanted` (owner and addresses): claims the blocks they lie in for this node
    /// (refused, naming the node, when another holds one), then records them as allocations of
    /// `source`. All or nothing: a refusal changes nothing, in the store or on the node.
    pub(super) async fn adopt(
        &self,
        wanted: Vec<(Owner, Vec<IpAddr>)>,
        pool: Option<&str>,
        source: AllocationSource,
        extra_blocks: Vec<(String, IpNet)>,
        dry_run: bool,
    ) -> Result<AdoptResponse, AgentError> {
        if !self.lock().connected {
            return Err(AgentError::TryAgain(
                "the agent has not read the cluster store yet: adoption claims blocks there; try again in a moment".into(),
            ));
        }
        let plan = self.plan_adoption(&self.lock(), &wanted, pool, &source, &extra_blocks)?;
        let mut response = AdoptResponse {
            adopted: plan.new.clone(),
            unchanged: plan.unchanged.clone(),
            claimed: grouped(&plan.claim),
            held: grouped(&plan.held),
            released: Vec::new(),
            dry_run,
        };
        // Held across the claims and the change in memory: the node neither settles a view nor
        // gives a block back in between (a just-claimed block is empty until the end).
        let mut view = self.blocks_sync.lock().await;
        let grants = if plan.claim.is_empty() { Vec::new() } else { self.store.grants().await? };
        let mut taken = Vec::new();
        for (pool, block) in &plan.claim {
            if let Some(g) = grants.iter().find(|g| g.pool == *pool && g.cidr == *block && g.node != self.cfg.node) {
                taken.push(format!("block {block} of pool {pool:?} is held by node {:?}", g.node));
            }
        }
        if !taken.is_empty() {
            return Err(AgentError::Conflict(format!(
                "{}: the addresses in it belong to that node; adopt on that node, or move its pods first; nothing was adopted",
                taken.join("; ")
            )));
        }
        if dry_run {
            return Ok(response);
        }
        let mut claimed: Vec<BlockGrant> = Vec::new();
        let mut failure = None;
        for (pool, block) in &plan.claim {
            let grant = BlockGrant { pool: pool.clone(), cidr: *block, node: self.cfg.node.clone() };
            if grants.iter().any(|g| g == &grant) {
                continue;
            }
            match self.store.grant_block(&grant).await {
                Ok(true) => claimed.push(grant),
                Ok(false) => {
                    match self.holder_of(pool, block).await {
                        Some(g) if g.node == self.cfg.node => {}
                        Some(g) => {
                            failure = Some(AgentError::Conflict(format!(
                                "block {block} of pool {pool:?} was just taken by node {:?}; nothing was adopted",
                                g.node
                            )));
                            break;
                        }
                        None => {
                            failure = Some(AgentError::TryAgain(format!(
                                "block {block} of pool {pool:?} cannot be claimed now (released a moment ago and reserved, or the pool changed); try again later; nothing was adopted"
                            )));
                            break;
                        }
                    }
                }
                Err(e) => {
                    failure = Some(e.into());
                    break;
                }
            }
        }
        // Last check under the lock: an ADD may have taken an address since the plan.
        let result = match failure {
            Some(e) => Err(e),
            None => {
                let mut st = self.lock();
                match self.plan_adoption(&st, &wanted, pool, &source, &extra_blocks) {
                    Err(e) => Err(e),
                    Ok(again) => {
                        for a in &again.new {
                            st.owners.insert(a.owner.clone(), a.clone());
                        }
                        for (pool, block) in again.claim.iter().chain(&again.held) {
                            if st.alloc.holds(pool, block) {
                                for a in &again.new {
                                    for ip in a.ips.iter().filter(|i| i.pool == *pool && block.contains(&i.address.addr())) {
                                        if let Err(e) = st.alloc.mark_used(pool, ip.address.addr()) {
                                            tracing::error!(owner = %a.owner, error = %e, "marking an adopted address");
                                        }
                                    }
                                }
                            } else {
                                self.add_block(&mut st, pool, *block);
                                if let Some(v) = view.as_mut() {
                                    v.note_granted(&BlockGrant { pool: pool.clone(), cidr: *block, node: self.cfg.node.clone() });
                                }
                            }
                        }
                        let queued = (!again.new.is_empty()).then(|| self.records.enqueue(again.new.iter().cloned().map(Op::Put).collect()));
                        response.adopted = again.new;
                        response.unchanged = again.unchanged;
                        Ok(queued)
                    }
                }
            }
        };
        let queued = match result {
            Ok(q) => q,
            Err(e) => {
                for g in &claimed {
                    if let Err(re) = self.store.release_block(g).await {
                        tracing::error!(pool = %g.pool, block = %g.cidr, error = %re, "giving back a block claimed for a refused adoption failed");
                    }
                }
                return Err(e);
            }
        };
        drop(view);
        if let Some(q) = queued {
            // Kept in memory when the write fails: the addresses stay out of reach, as an ADD's.
            q.durable().await.map_err(|e| AgentError::Internal(e.to_string()))?;
        }
        self.save_view();
        for a in &response.adopted {
            tracing::info!(owner = %a.owner, source = %a.source, ips = ?a.ips.iter().map(|i| i.address).collect::<Vec<_>>(), "adopted");
        }
        for g in &claimed {
            tracing::info!(pool = %g.pool, block = %g.cidr, "claimed a block for adopted addresses");
        }
        self.demand_changed.notify_one();
        Ok(response)
    }

    /// `allot adopt host-local DIR`: adopts every lease in the directory, frees adopted ones
    /// whose file is gone, and keeps the directory for rescans.
    pub async fn adopt_host_local(&self, req: &AdoptHostLocalRequest) -> Result<AdoptResponse, AgentError> {
        let dir = PathBuf::from(&req.dir);
        let dir = dir.canonicalize().unwrap_or(dir);
        // The directory's record is written under the same lock as its scan: a DEL or a rescan of
        // a namesake directory in between would not know whose owners these are.
        let _sync = self.host_local_sync.lock().await;
        let response = self.sync_host_local_locked(&dir, req.pool.as_deref(), req.dry_run).await?;
        if !req.dry_run {
            let scan_network = response_network(&dir);
            let mut ad = self.adoptions.lock().unwrap_or_else(|p| p.into_inner());
            let known = ad.host_local.iter_mut().find(|h| h.dir == dir);
            match known {
                Some(h) => h.pool = req.pool.clone(),
                None => {
                    let adopted = response.adopted.iter().map(|a| a.owner.clone()).chain(response.unchanged.iter().cloned()).collect();
                    ad.host_local.push(HostLocalDir { dir: dir.clone(), network: scan_network, pool: req.pool.clone(), released: BTreeSet::new(), adopted })
                }
            }
            self.save_adoptions(&ad)?;
        }
        Ok(response)
    }

    /// Reads the directory once: adopts new leases (all or nothing), frees adopted owners of
    /// that network whose file is gone.
    async fn sync_host_local(&self, dir: &Path, pool: Option<&str>, dry_run: bool) -> Result<AdoptResponse, AgentError> {
        // One at a time (the rescan loop, `allot adopt`, allot's DEL and GC of adopted owners):
        // a scan read before another's change would free what it just adopted, or adopt back
        // what it just freed.
        let _sync = self.host_local_sync.lock().await;
        self.sync_host_local_locked(dir, pool, dry_run).await
    }

    /// `sync_host_local` with `host_local_sync` already held.
    async fn sync_host_local_locked(&self, dir: &Path, pool: Option<&str>, dry_run: bool) -> Result<AdoptResponse, AgentError> {
        let scan = hostlocal::scan(dir).map_err(|e| match e {
            hostlocal::HostLocalError::Invalid(m) => AgentError::Invalid(m),
            hostlocal::HostLocalError::Unreadable(m) => AgentError::Internal(m),
        })?;
        let released: BTreeSet<Owner> = {
            let ad = self.adoptions.lock().unwrap_or_else(|p| p.into_inner());
            ad.host_local.iter().find(|h| h.dir == dir).map(|h| h.released.clone()).unwrap_or_default()
        };
        let present: BTreeSet<Owner> = scan
            .by_attachment()
            .into_keys()
            .map(|(container_id, ifname)| Owner { network: scan.network.clone(), container_id, ifname })
            .collect();
        let wanted: Vec<(Owner, Vec<IpAddr>)> = scan
            .by_attachment()
            .into_iter()
            .map(|((container_id, ifname), ips)| (Owner { network: scan.network.clone(), container_id, ifname }, ips))
            .filter(|(o, _)| !released.contains(o))
            .collect();
        let source = AllocationSource::Adopted(HOST_LOCAL.into());
        // Gone: adopted from this directory, and no file names the owner any more.
        let (here, elsewhere, namesakes) = {
            let ad = self.adoptions.lock().unwrap_or_else(|p| p.into_inner());
            let here: BTreeSet<Owner> = ad.host_local.iter().filter(|h| h.dir == dir).flat_map(|h| h.adopted.iter().cloned()).collect();
            let elsewhere: BTreeSet<Owner> = ad.host_local.iter().filter(|h| h.dir != dir).flat_map(|h| h.adopted.iter().cloned()).collect();
            let namesakes: Vec<PathBuf> = ad.host_local.iter().filter(|h| h.dir != dir && h.network == scan.network).map(|h| h.dir.clone()).collect();
            (here, elsewhere, namesakes)
        };
        let mut gone: Vec<Owner> = self
            .lock()
            .owners
            .values()
            .filter(|a| a.source == source && a.owner.network == scan.network && !present.contains(&a.owner))
            .filter(|a| here.contains(&a.owner) || !elsewhere.contains(&a.owner))
            .map(|a| a.owner.clone())
            .collect();
        // Listed nowhere: gone only if no other directory of this name names it (one that
        // cannot be read might: kept).
        if gone.iter().any(|o| !here.contains(o)) {
            for other in &namesakes {
                let named: Option<BTreeSet<(String, String)>> = hostlocal::scan(other).ok().map(|s| s.by_attachment().into_keys().collect());
                gone.retain(|o| here.contains(o) || named.as_ref().is_some_and(|n| !n.contains(&(o.container_id.clone(), o.ifname.clone()))));
            }
        }
        let mut response = match self.adopt(wanted, pool, source.clone(), Vec::new(), dry_run).await {
            Ok(r) => r,
            // Frees still happen when a new lease cannot be adopted (in a rescan).
            Err(e) if !gone.is_empty() && !dry_run => {
                self.release_adopted(&gone).await?;
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        if !gone.is_empty() {
            response.released = if dry_run { gone } else { self.release_adopted(&gone).await? };
        }
        // Released owners whose file is gone are forgotten; the owners held from here noted.
        if !dry_run {
            let held: BTreeSet<Owner> = self.lock().owners.values().filter(|a| a.source == source).map(|a| a.owner.clone()).collect();
            let mut ad = self.adoptions.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(h) = ad.host_local.iter_mut().find(|h| h.dir == dir) {
                let before = (h.released.clone(), h.adopted.clone());
                h.released.retain(|o| present.contains(o));
                h.adopted.extend(present.iter().filter(|o| held.contains(*o)).cloned());
                h.adopted.retain(|o| held.contains(o));
                if (&h.released, &h.adopted) != (&before.0, &before.1) {
                    self.save_adoptions(&ad)?;
                }
            }
        }
        Ok(response)
    }

    async fn release_adopted(&self, gone: &[Owner]) -> Result<Vec<Owner>, AgentError> {
        let released = self.release_owners(gone).await?;
        for a in &released {
            tracing::info!(owner = %a.owner, ips = ?a.ips.iter().map(|i| i.address).collect::<Vec<_>>(), "adopted allocation freed: its host-local file is gone (the old plugin's DEL)");
        }
        Ok(released.into_iter().map(|a| a.owner).collect())
    }

    /// Whether a DEL of `owner` concerns an adopted allocation: the owner's own, or, when allot
    /// holds nothing for the owner, an adopted one of the same container and ifname.
    pub(super) fn touches_adopted(&self, owner: &Owner) -> bool {
        let st = self.lock();
        match st.owners.get(owner) {
            Some(a) => a.source.is_adopted(),
            None => st.owners.values().any(|a| a.source.is_adopted() && same_attachment(&a.owner, owner)),
        }
    }

    /// DEL of an adopted owner, or of one allot does not hold while an adopted owner of the same
    /// container and ifname exists: after `allot node switch` the runtime tears an old pod down
    /// with the config it has now, so the DEL names allot's network, not the adopted one. Such
    /// an owner is freed and its host-local lease removed (the old plugin never runs for it
    /// again). Durable before it returns, as any DEL.
    pub(super) async fn del_adopted(&self, owner: &Owner) -> Result<Option<Allocation>, AgentError> {
        // No rescan in between: one that read the directory before this would adopt it back.
        let _sync = self.host_local_sync.lock().await;
        // Remembered as released before the journal frees them: after a crash in between, no
        // restart adopts a lease file of a pod that is gone (and whose address may be reused).
        let exact: Vec<Allocation> = self.lock().owners.get(owner).filter(|a| a.source.is_adopted()).cloned().into_iter().collect();
        if !exact.is_empty() {
            // The old network's own name: its file stays, remembered so it is not adopted again.
            self.note_released(&exact);
            return Ok(self.release_owners(std::slice::from_ref(owner)).await?.into_iter().next());
        }
        let same: Vec<Allocation> = self
            .lock()
            .owners
            .values()
            .filter(|a| a.source.is_adopted() && same_attachment(&a.owner, owner))
            .cloned()
            .collect();
        self.note_released(&same);
        let owners: Vec<Owner> = same.iter().map(|a| a.owner.clone()).collect();
        let freed = self.release_owners(&owners).await?;
        self.forget_leases(&freed, &format!("DEL of {owner}")).await;
        Ok(freed.into_iter().next())
    }

    /// GC's share of adopted owners: those adopted under `network` itself whose container and
    /// ifname it does not list. An old pod's attachment belongs to the old network; whether a
    /// runtime lists it as valid under allot's network depends on the runtime (the spec's list
    /// is per network), and guessing wrong hands a live address out twice. So a GC of another network frees none:
    /// the old pod's DEL does (`del_adopted`), or its lease file's removal.
    pub(super) async fn gc_adopted(&self, network: &str, valid: &HashSet<(&str, &str)>) -> Result<Vec<Allocation>, AgentError> {
        let stale = |st: &State| -> Vec<Owner> {
            st.owners
                .values()
                .filter(|a| a.source.is_adopted() && a.owner.network == network)
                .filter(|a| !valid.contains(&(a.owner.container_id.as_str(), a.owner.ifname.as_str())))
                .map(|a| a.owner.clone())
                .collect()
        };
        if stale(&self.lock()).is_empty() {
            return Ok(Vec::new());
        }
        let _sync = self.host_local_sync.lock().await;
        let gone = stale(&self.lock());
        let noted: Vec<Allocation> = {
            let st = self.lock();
            gone.iter().filter_map(|o| st.owners.get(o).cloned()).collect()
        };
        self.note_released(&noted);
        self.release_owners(&gone).await
    }

    /// Removes the host-local leases of adopted owners allot just freed (`why`: the DEL or GC)
    /// from the directories they were adopted from, so no rescan or restart adopts them again.
    async fn forget_leases(&self, freed: &[Allocation], why: &str) {
        let host_local: Vec<&Allocation> = freed.iter().filter(|a| a.source == AllocationSource::Adopted(HOST_LOCAL.into())).collect();
        if host_local.is_empty() {
            return;
        }
        // Noted first: a lease that cannot be removed, or is still there after a crash, stays
        // released; the next rescan forgets the note once the file is gone.
        self.note_released(freed);
        let dirs: Vec<HostLocalDir> = self.adoptions.lock().unwrap_or_else(|p| p.into_inner()).host_local.clone();
        for a in host_local {
            let ips: Vec<IpAddr> = a.ips.iter().map(|i| i.address.addr()).collect();
            for h in dirs.iter().filter(|h| h.network == a.owner.network) {
                let (dir, id, ifname, wanted) = (h.dir.clone(), a.owner.container_id.clone(), a.owner.ifname.clone(), ips.clone());
                // host-local's lock may be held a moment by the old plugin: off the runtime.
                let removed = tokio::task::spawn_blocking(move || hostlocal::remove_leases(&dir, &id, &ifname, &wanted))
                    .await
                    .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
                match removed {
                    Ok(ips) if ips.is_empty() => {}
                    Ok(ips) => tracing::info!(owner = %a.owner, dir = %h.dir.display(), ips = %fmt_ips(&ips), "{why} freed an adopted allocation and removed its host-local lease (the old plugin never runs for it)"),
                    Err(e) => tracing::warn!(owner = %a.owner, dir = %h.dir.display(), error = %e, "{why} freed an adopted allocation but removing its host-local lease failed: it stays, not adopted again"),
                }
            }
        }
    }

    /// Remembers adopted host-local owners that allot released (DEL, GC) while their file may
    /// still exist, so a rescan does not adopt them again.
    pub(super) fn note_released(&self, released: &[Allocation]) {
        let adopted: Vec<&Owner> = released
            .iter()
            .filter(|a| a.source == AllocationSource::Adopted(HOST_LOCAL.into()))
            .map(|a| &a.owner)
            .collect();
        if adopted.is_empty() {
            return;
        }
        let mut ad = self.adoptions.lock().unwrap_or_else(|p| p.into_inner());
        let mut changed = false;
        for h in ad.host_local.iter_mut() {
            for o in adopted.iter().filter(|o| o.network == h.network) {
                let file_left = hostlocal::scan(&h.dir).is_ok_and(|s| {
                    s.leases.iter().any(|l| l.container_id == o.container_id && l.ifname == o.ifname)
                });
                if file_left {
                    changed |= h.released.insert((*o).clone());
                }
            }
        }
        if changed && let Err(e) = self.save_adoptions(&ad) {
            tracing::error!(error = %e, "saving released adopted owners failed: a restart may adopt them again from their host-local files");
        }
    }

    /// `allot adopt pod-cidr CIDR --pool NAME`: claims the blocks of `cidr` for this node and
    /// keeps them (never given back while pinned), or with `release`, stops keeping them. While
    /// pinned, no ADD gets an address in them: which ones the old pods hold is not known here
    /// (host-local adoption knows, this does not), so new pods take the pool's other blocks.
    pub async fn adopt_pod_cidr(&self, req: &AdoptPodCidrRequest) -> Result<AdoptResponse, AgentError> {
        let cidr = req.cidr;
        if cidr.trunc() != cidr {
            return Err(AgentError::Invalid(format!("pod CIDR {cidr} is not canonical: did you mean {}?", cidr.trunc())));
        }
        if req.release {
            let mut ad = self.adoptions.lock().unwrap_or_else(|p| p.into_inner());
            let Some(at) = ad.pod_cidrs.iter().position(|p| p.pool == req.pool && p.cidr == cidr) else {
                return Err(AgentError::NotFound(format!("pod CIDR {cidr} of pool {:?} is not adopted on this node", req.pool)));
            };
            let pinned = ad.pod_cidrs[at].clone();
            if !req.dry_run {
                ad.pod_cidrs.remove(at);
                self.save_adoptions(&ad)?;
                let mut st = self.lock();
                for b in &pinned.blocks {
                    st.pinned.remove(&(pinned.pool.clone(), *b));
                    st.alloc.set_reserved(&pinned.pool, b, false);
                }
                drop(st);
                self.demand_changed.notify_one();
            }
            return Ok(AdoptResponse {
                held: vec![PoolAllocation { pool: pinned.pool, cidrs: pinned.blocks }],
                dry_run: req.dry_run,
                ..AdoptResponse::default()
            });
        }
        let blocks = {
            let st = self.lock();
            let Some(spec) = st.pools.get(&req.pool) else {
                return Err(AgentError::NotFound(format!("pool {:?} does not exist: create it with `allot pool apply` first", req.pool)));
            };
            let family = Family::of(&cidr);
            let Some(f) = spec.family(family).filter(|f| f.cidrs.iter().any(|c| c.contains(&cidr))) else {
                return Err(AgentError::Invalid(format!(
                    "pod CIDR {cidr} lies in no {family} CIDR of pool {:?} ({}): add it to the pool first",
                    req.pool,
                    describe_pools(&st.pools, Some(&req.pool))
                )));
            };
            if cidr.prefix_len() >= f.mask_size {
                vec![IpNet::new(cidr.addr(), f.mask_size).expect("mask fits").trunc()]
            } else {
                let count = 1usize.checked_shl(u32::from(f.mask_size - cidr.prefix_len())).unwrap_or(usize::MAX);
                if count > MAX_POD_CIDR_BLOCKS {
                    return Err(AgentError::Invalid(format!(
                        "pod CIDR {cidr} spans {count} blocks of /{} (more than {MAX_POD_CIDR_BLOCKS}): adopt the host-local directory instead, or a smaller CIDR",
                        f.mask_size
                    )));
                }
                cidr.subnets(f.mask_size).expect("mask fits").collect()
            }
        };
        let extra: Vec<(String, IpNet)> = blocks.iter().map(|b| (req.pool.clone(), *b)).collect();
        // Pinned before the claim: a block claimed empty must not be given back by the demand
        // loop before the pin lands.
        let newly: Vec<(String, IpNet)> = if req.dry_run {
            Vec::new()
        } else {
            let mut st = self.lock();
            let newly: Vec<_> = extra.iter().filter(|k| st.pinned.insert((*k).clone())).cloned().collect();
            for (pool, block) in &newly {
                st.alloc.set_reserved(pool, block, true);
            }
            newly
        };
        let result = self.adopt(Vec::new(), Some(&req.pool), AllocationSource::Cni, extra, req.dry_run).await;
        let saved = match &result {
            Ok(_) if !req.dry_run => {
                let mut ad = self.adoptions.lock().unwrap_or_else(|p| p.into_inner());
                if ad.pod_cidrs.iter().any(|p| p.pool == req.pool && p.cidr == cidr) {
                    Ok(())
                } else {
                    ad.pod_cidrs.push(PinnedCidr { pool: req.pool.clone(), cidr, blocks: blocks.clone() });
                    self.save_adoptions(&ad)
                }
            }
            _ => Ok(()),
        };
        if result.is_err() || saved.is_err() {
            let mut st = self.lock();
            for k in &newly {
                st.pinned.remove(k);
                st.alloc.set_reserved(&k.0, &k.1, false);
            }
        }
        saved?;
        result
    }

    fn save_adoptions(&self, ad: &Adoptions) -> Result<(), AgentError> {
        let path = self.cfg.data_dir.join(ADOPTIONS_FILE);
        write_atomically(&path, &serde_json::to_vec_pretty(ad).expect("adoptions encode"))
            .map_err(|e| AgentError::Internal(format!("writing {}: {e}", path.display())))
    }

    /// Rescans every adopted host-local directory (and those of `--adopt-host-local`) every
    /// `RESCAN_EVERY`. Until the directories given at start are adopted, ADDs wait: an address
    /// of theirs must not be handed out first. With `adopt_missing_ok` one that does not exist
    /// holds nothing and does not make ADDs wait; it is adopted when it appears.
    pub async fn adopt_loop(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut startup: Vec<PathBuf> = self.cfg.adopt_host_local.clone();
        // With --adopt-host-local-missing-ok, directories that do not exist (yet): the old CNI
        // made no pod on this node. They do not hold ADDs back (a node that joins mid-migration
        // must work) and are adopted once they appear.
        let mut missing: Vec<PathBuf> = Vec::new();
        let mut last_error: BTreeMap<PathBuf, String> = BTreeMap::new();
        loop {
            if self.lock().connected {
                for dir in std::mem::take(&mut missing) {
                    // An error other than "not found" goes to the startup path, which reports it.
                    if matches!(dir.try_exists(), Ok(false)) { missing.push(dir) } else { startup.push(dir) }
                }
                for dir in std::mem::take(&mut startup) {
                    if self.cfg.adopt_missing_ok && matches!(dir.try_exists(), Ok(false)) {
                        tracing::warn!(
                            dir = %dir.display(),
                            "--adopt-host-local: the directory does not exist, so the old CNI holds no address on this node; \
                             it is adopted if it appears (check the path if this node ran pods on the old CNI)"
                        );
                        missing.push(dir);
                        continue;
                    }
                    // The flag names no pool: one given earlier with `allot adopt --pool` stays.
                    let canonical = dir.canonicalize().unwrap_or_else(|_| dir.clone());
                    let pool = self.adoptions.lock().unwrap_or_else(|p| p.into_inner()).host_local.iter().find(|h| h.dir == canonical).and_then(|h| h.pool.clone());
                    let req = AdoptHostLocalRequest { dir: dir.display().to_string(), pool, dry_run: false };
                    match self.adopt_host_local(&req).await {
                        Ok(r) => {
                            last_error.remove(&dir);
                            tracing::info!(dir = %dir.display(), adopted = r.adopted.len(), unchanged = r.unchanged.len(), "adopted host-local directory (--adopt-host-local)")
                        }
                        Err(e) => {
                            let why = format!("adopting host-local directory {} (--adopt-host-local) failed: {e}", dir.display());
                            // Once per distinct error, not every retry; the readiness reason keeps it visible.
                            if last_error.get(&dir) != Some(&why) {
                                tracing::error!("{why}; retrying every {RESCAN_EVERY:?}, no new addresses meanwhile");
                                last_error.insert(dir.clone(), why.clone());
                            }
                            self.lock().adoption_blocked = Some(why);
                            startup.push(dir);
                        }
                    }
                }
                if startup.is_empty() && self.lock().adoption_blocked.take().is_some() {
                    self.room_changed.notify_waiters();
                }
                let dirs: Vec<HostLocalDir> = self.adoptions.lock().unwrap_or_else(|p| p.into_inner()).host_local.clone();
                for h in dirs.iter().filter(|h| !startup.contains(&h.dir)) {
                    match self.sync_host_local(&h.dir, h.pool.as_deref(), false).await {
                        Ok(_) => {
                            if last_error.remove(&h.dir).is_some() {
                                tracing::info!(dir = %h.dir.display(), "host-local directory adopted again after an error");
                            }
                        }
                        Err(e) => {
                            let msg = e.to_string();
                            if last_error.get(&h.dir) != Some(&msg) {
                                tracing::error!(dir = %h.dir.display(), error = %msg, "rescanning an adopted host-local directory failed (nothing freed that still has a file)");
                                last_error.insert(h.dir.clone(), msg);
                            }
                        }
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(RESCAN_EVERY) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// The same pod interface, whatever network names it.
fn same_attachment(a: &Owner, b: &Owner) -> bool {
    a.container_id == b.container_id && a.ifname == b.ifname
}

fn response_network(dir: &Path) -> String {
    dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

fn fmt_ips(ips: &[IpAddr]) -> String {
    ips.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(", ")
}
