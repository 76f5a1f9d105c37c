//! Where the CLI's cluster-wide commands go: the local agent's socket, or the cluster store
//! directly (etcd, or the Kubernetes API).

use allot_client::Client;
use allot_wire::{
    AnnotateRequest, ApplyRequest, ApplyResult, NamespaceResource, NodeResource, PoolResource, Status,
};

#[cfg(any(feature = "etcd", feature = "kubernetes"))]
use allot_store::Store;

// One backend per CLI run: the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Backend {
    Agent(Client),
    #[cfg(feature = "etcd")]
    Etcd { store: allot_store::EtcdStore, rt: tokio::runtime::Runtime },
    #[cfg(feature = "kubernetes")]
    Kube { store: allot_k8s::KubeStore, rt: tokio::runtime::Runtime },
}

/// Where the cluster state lives (`--store`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreKind {
    /// The agent's own file (standalone, one machine).
    Embedded,
    Etcd,
    /// The Kubernetes API server (allot.dev CRDs).
    Kubernetes,
}

/// Global flags that choose the backend.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ClusterFlags {
    /// Talk to etcd directly instead of the local agent (comma-separated URLs).
    #[arg(long, global = true, env = "ALLOT_ETCD_ENDPOINTS", value_delimiter = ',', value_name = "URLS")]
    pub etcd_endpoints: Vec<String>,
    /// CA certificate (PEM) that signed etcd's server certificate.
    #[arg(long, global = true, env = "ALLOT_ETCD_CA", value_name = "FILE")]
    pub etcd_ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for etcd.
    #[arg(long, global = true, env = "ALLOT_ETCD_CERT", value_name = "FILE")]
    pub etcd_cert: Option<std::path::PathBuf>,
    /// Client key (PEM) for etcd.
    #[arg(long, global = true, env = "ALLOT_ETCD_KEY", value_name = "FILE")]
    pub etcd_key: Option<std::path::PathBuf>,
    /// etcd user, when etcd has authentication enabled.
    #[arg(long, global = true, env = "ALLOT_ETCD_USER", value_name = "NAME")]
    pub etcd_user: Option<String>,
    /// Password of --etcd-user (prefer the environment variable: flags show in `ps`).
    #[arg(long, global = true, env = "ALLOT_ETCD_PASSWORD", value_name = "PASSWORD", hide_env_values = true)]
    pub etcd_password: Option<String>,
    /// The cluster store (default: etcd with --etcd-endpoints, else kubernetes with
    /// --kubeconfig or when running in a pod, else embedded: the local agent's).
    #[arg(long, global = true, env = "ALLOT_STORE", value_enum, value_name = "STORE")]
    pub store: Option<StoreKind>,
    /// kubeconfig for --store kubernetes (default: in-cluster config in a pod, else $KUBECONFIG
    /// or ~/.kube/config).
    #[arg(long, global = true, env = "ALLOT_KUBECONFIG", value_name = "PATH")]
    pub kubeconfig: Option<std::path::PathBuf>,
    /// With --store kubernetes, also read Cilium's `cilium.io/v2alpha1 CiliumPodIPPool` objects
    /// as pools (read-only; an allot `IPPool` of the same name wins), so a cluster keeps its YAML.
    #[arg(long, global = true, env = "ALLOT_WATCH_CILIUM_POOLS")]
    pub watch_cilium_pools: bool,
}

impl ClusterFlags {
    /// The Kubernetes store's options these flags ask for.
    pub fn kube_store_options(&self) -> allot_k8s::KubeStoreOptions {
        allot_k8s::KubeStoreOptions { watch_cilium_pools: self.watch_cilium_pools, ..Default::default() }
    }

    /// The store to use: `--store`, else etcd when endpoints are given, else Kubernetes when
    /// running in a pod, else embedded.
    pub fn store_kind(&self) -> anyhow::Result<StoreKind> {
        self.store_kind_in(in_cluster())
    }

    fn store_kind_in(&self, in_pod: bool) -> anyhow::Result<StoreKind> {
        let etcd = !self.etcd_endpoints.is_empty();
        let kind = match self.store {
            Some(k) => k,
            None if etcd => StoreKind::Etcd,
            None if self.kubeconfig.is_some() => StoreKind::Kubernetes,
            None if in_pod && cfg!(feature = "kubernetes") => StoreKind::Kubernetes,
            None => StoreKind::Embedded,
        };
        match kind {
            StoreKind::Etcd => anyhow::ensure!(etcd, "--store etcd needs --etcd-endpoints (or ALLOT_ETCD_ENDPOINTS)"),
            _ => anyhow::ensure!(!etcd, "--etcd-endpoints is for --store etcd, not --store {kind:?}: drop one of them"),
        }
        anyhow::ensure!(
            self.kubeconfig.is_none() || kind == StoreKind::Kubernetes,
            "--kubeconfig is for --store kubernetes, not --store {kind:?}"
        );
        Ok(kind)
    }

    /// A Kubernetes client from --kubeconfig, in-cluster config, or the default kubeconfig.
    #[cfg(feature = "kubernetes")]
    pub async fn kube_client(&self) -> anyhow::Result<kube::Client> {
        allot_k8s::client(self.kubeconfig.as_deref()).await.map_err(|e| {
            let from = match &self.kubeconfig {
                Some(p) => format!("kubeconfig {}", p.display()),
                None => "in-cluster config, $KUBECONFIG or ~/.kube/config".into(),
            };
            anyhow::anyhow!("no Kubernetes client from {from}: {e}; pass --kubeconfig PATH, or run in a pod")
        })
    }
}

#[cfg(feature = "kubernetes")]
fn in_cluster() -> bool {
    allot_k8s::in_cluster()
}

#[cfg(not(feature = "kubernetes"))]
fn in_cluster() -> bool {
    false
}

#[cfg(feature = "etcd")]
impl ClusterFlags {
    pub fn config(&self) -> anyhow::Result<allot_store::EtcdConfig> {
        let mut cfg = allot_store::EtcdConfig::new(self.etcd_endpoints.clone());
        let identity = match (&self.etcd_cert, &self.etcd_key) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
            _ => anyhow::bail!("an etcd client certificate needs both --etcd-cert and --etcd-key"),
        };
        match (&self.etcd_ca, identity) {
            (None, None) => {}
            (Some(ca), identity) => cfg.tls = Some(allot_store::EtcdTls { ca: ca.clone(), identity }),
            (None, Some(_)) => anyhow::bail!("--etcd-cert needs --etcd-ca, the CA that signed etcd's certificate"),
        }
        match (&self.etcd_user, &self.etcd_password) {
            (None, None) => {}
            (Some(user), Some(password)) => cfg.user = Some((user.clone(), password.clone())),
            (Some(_), None) => anyhow::bail!("--etcd-user needs --etcd-password (or ALLOT_ETCD_PASSWORD)"),
            (None, Some(_)) => anyhow::bail!("--etcd-password needs --etcd-user (or ALLOT_ETCD_USER)"),
        }
        Ok(cfg)
    }
}

impl Backend {
    pub fn new(client: Client, flags: &ClusterFlags) -> anyhow::Result<Backend> {
        match flags.store_kind()? {
            StoreKind::Embedded => Ok(Backend::Agent(client)),
            #[cfg(feature = "etcd")]
            StoreKind::Etcd => {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                let store = rt.block_on(allot_store::EtcdStore::connect(&flags.config()?))?;
                Ok(Backend::Etcd { store, rt })
            }
            #[cfg(feature = "kubernetes")]
            StoreKind::Kubernetes => {
                // The store's watches run on this runtime's worker while a command waits.
                let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
                let store = rt.block_on(async {
                    let client = flags.kube_client().await?;
                    Ok::<_, anyhow::Error>(allot_k8s::KubeStore::connect(client, flags.kube_store_options()).await?)
                })?;
                Ok(Backend::Kube { store, rt })
            }
            #[allow(unreachable_patterns)]
            other => anyhow::bail!("this allot was built without the {other:?} store (cargo feature)"),
        }
    }

    pub fn pools(&self) -> anyhow::Result<Vec<PoolResource>> {
        match self {
            Backend::Agent(c) => Ok(c.get("/v1/pools")?),
            #[cfg(feature = "etcd")]
            Backend::Etcd { store, rt } => {
                Ok(rt.block_on(store.pools())?.into_iter().map(allot_store::pool_resource).collect())
            }
            #[cfg(feature = "kubernetes")]
            Backend::Kube { store, rt } => {
                Ok(rt.block_on(store.pools())?.into_iter().map(allot_store::pool_resource).collect())
            }
        }
    }

    pub fn pool(&self, name: &str) -> anyhow::Result<PoolResource> {
        match self {
            Backend::Agent(c) => Ok(c.get(&format!("/v1/pools/{name}"))?),
            #[cfg(any(feature = "etcd", feature = "kubernetes"))]
            _ => self
                .pools()?
                .into_iter()
                .find(|p| p.metadata.name == name)
                .ok_or_else(|| anyhow::anyhow!("pool {name:?} not found")),
        }
    }

    pub fn apply(&self, pools: Vec<PoolResource>) -> anyhow::Result<Vec<ApplyResult>> {
        match self {
            Backend::Agent(c) => Ok(c.post("/v1/pools", &ApplyRequest { pools })?),
            #[cfg(feature = "etcd")]
            Backend::Etcd { store, rt } => direct_apply(store, rt, pools),
            #[cfg(feature = "kubernetes")]
            Backend::Kube { store, rt } => direct_apply(store, rt, pools),
        }
    }

    pub fn delete_pool(&self, name: &str) -> anyhow::Result<()> {
        match self {
            Backend::Agent(c) => c.delete::<serde_json::Value>(&format!("/v1/pools/{name}")).map(|_| ()).map_err(Into::into),
            #[cfg(feature = "etcd")]
            Backend::Etcd { store, rt } => Ok(rt.block_on(store.delete_pool(name))?),
            #[cfg(feature = "kubernetes")]
            Backend::Kube { store, rt } => Ok(rt.block_on(store.delete_pool(name))?),
        }
    }

    pub fn nodes(&self) -> anyhow::Result<Vec<NodeResource>> {
        match self {
            Backend::Agent(c) => Ok(c.get("/v1/nodes")?),
            #[cfg(feature = "etcd")]
            Backend::Etcd { store, rt } => direct_nodes(store, rt),
            #[cfg(feature = "kubernetes")]
            Backend::Kube { store, rt } => direct_nodes(store, rt),
        }
    }

    /// One node; without a name, the local agent's node.
    pub fn node(&self, name: Option<String>) -> anyhow::Result<NodeResource> {
        match (self, name) {
            (Backend::Agent(c), name) => {
                let name = match name {
                    Some(n) => n,
                    None => c.get::<Status>("/v1/status")?.node,
                };
                Ok(c.get(&format!("/v1/nodes/{name}"))?)
            }
            #[cfg(any(feature = "etcd", feature = "kubernetes"))]
            (_, None) => anyhow::bail!("name the node: with --etcd-endpoints or --store kubernetes there is no local node"),
            #[cfg(any(feature = "etcd", feature = "kubernetes"))]
            (_, Some(name)) => self
                .nodes()?
                .into_iter()
                .find(|n| n.metadata.name == name)
                .ok_or_else(|| anyhow::anyhow!("node {name:?} not found")),
        }
    }

    /// Removes a node and releases its blocks; returns how many. A live node (its agent runs)
    /// is refused unless `force`; released blocks stay reserved to it for `grace` (etcd).
    pub fn delete_node(&self, name: &str, force: bool, grace: Option<std::time::Duration>) -> anyhow::Result<u64> {
        match self {
            Backend::Agent(c) => {
                // Standalone, the agent answering is the only live node: its own.
                let own = c.get::<Status>("/v1/status")?.node;
                anyhow::ensure!(
                    force || own != name,
                    "node {name:?} is live: it is this agent's own node, and its pods use its blocks; \
                     stop the agent first, or pass --force"
                );
                anyhow::ensure!(grace.is_none(), "--grace applies to the cluster store: pass --etcd-endpoints");
                let v: serde_json::Value = c.delete(&format!("/v1/nodes/{name}")).map_err(|e| {
                    let through = if force && matches!(&e, allot_client::ClientError::Api(a) if a.kind == allot_wire::ErrorKind::Conflict) {
                        "\n(--force through the local agent only lifts the own-node check; to delete another live node, \
                         run `allot --etcd-endpoints ... node delete NAME --force`)"
                    } else {
                        ""
                    };
                    anyhow::anyhow!("{e}{through}")
                })?;
                Ok(v["releasedBlocks"].as_u64().unwrap_or(0))
            }
            #[cfg(feature = "etcd")]
            Backend::Etcd { store, rt } => {
                let store = match grace {
                    Some(g) => store.with_release_grace(g),
                    None => store.clone(),
                };
                let released = if force {
                    rt.block_on(store.force_delete_node(name))?
                } else {
                    rt.block_on(store.delete_node(name))?
                };
                Ok(released.len() as u64)
            }
            #[cfg(feature = "kubernetes")]
            Backend::Kube { store, rt } => {
                let store = match grace {
                    Some(g) => store.with_release_grace(g),
                    None => store.clone(),
                };
                let released = if force {
                    rt.block_on(store.force_delete_node(name))?
                } else {
                    rt.block_on(store.delete_node(name))?
                };
                Ok(released.len() as u64)
            }
        }
    }

    pub fn annotate(&self, ns: &str, req: AnnotateRequest) -> anyhow::Result<NamespaceResource> {
        match self {
            Backend::Agent(c) => Ok(c.post(&format!("/v1/namespaces/{ns}/annotations"), &req)?),
            #[cfg(feature = "etcd")]
            Backend::Etcd { store, rt } => {
                let annotations = rt.block_on(store.annotate_namespace(ns, req.set, req.remove))?;
                Ok(NamespaceResource { metadata: allot_wire::ObjectMeta { name: ns.to_string(), annotations } })
            }
            #[cfg(feature = "kubernetes")]
            Backend::Kube { store, rt } => {
                let annotations = rt.block_on(store.annotate_namespace(ns, req.set, req.remove))?;
                Ok(NamespaceResource { metadata: allot_wire::ObjectMeta { name: ns.to_string(), annotations } })
            }
        }
    }

    pub fn namespaces(&self) -> anyhow::Result<Vec<NamespaceResource>> {
        match self {
            Backend::Agent(c) => Ok(c.get("/v1/namespaces")?),
            #[cfg(feature = "etcd")]
            Backend::Etcd { store, rt } => direct_namespaces(store, rt),
            #[cfg(feature = "kubernetes")]
            Backend::Kube { store, rt } => direct_namespaces(store, rt),
        }
    }

    /// The agent's client, for commands that only a node's agent can answer.
    pub fn agent(&self, what: &str) -> anyhow::Result<&Client> {
        match self {
            Backend::Agent(c) => Ok(c),
            #[cfg(any(feature = "etcd", feature = "kubernetes"))]
            _ => {
                anyhow::bail!("{what} lives on each node: leave out --etcd-endpoints / --store and point --socket at that node's agent")
            }
        }
    }
}

#[cfg(any(feature = "etcd", feature = "kubernetes"))]
fn direct_apply<S: Store>(store: &S, rt: &tokio::runtime::Runtime, pools: Vec<PoolResource>) -> anyhow::Result<Vec<ApplyResult>> {
    let pools: Vec<_> = pools.into_iter().map(allot_store::pool_from_resource).collect();
    let names: Vec<String> = pools.iter().map(|p| p.name.clone()).collect();
    let actions = rt.block_on(store.apply_pools(pools))?;
    Ok(names.into_iter().zip(actions).map(|(name, action)| ApplyResult { name, action }).collect())
}

#[cfg(any(feature = "etcd", feature = "kubernetes"))]
fn direct_nodes<S: Store>(store: &S, rt: &tokio::runtime::Runtime) -> anyhow::Result<Vec<NodeResource>> {
    rt.block_on(async {
        let grants = store.grants().await?;
        Ok(store.nodes().await?.iter().map(|n| allot_store::node_resource(n, &grants)).collect())
    })
}

#[cfg(any(feature = "etcd", feature = "kubernetes"))]
fn direct_namespaces<S: Store>(store: &S, rt: &tokio::runtime::Runtime) -> anyhow::Result<Vec<NamespaceResource>> {
    Ok(rt
        .block_on(store.namespaces())?
        .into_iter()
        .map(|(name, annotations)| NamespaceResource { metadata: allot_wire::ObjectMeta { name, annotations } })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(args: &[&str]) -> ClusterFlags {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            f: ClusterFlags,
        }
        <Cli as clap::Parser>::try_parse_from(std::iter::once("allot").chain(args.iter().copied())).unwrap().f
    }

    #[test]
    fn store_kind_defaults_and_conflicts() {
        assert_eq!(flags(&[]).store_kind_in(false).unwrap(), StoreKind::Embedded);
        assert_eq!(flags(&["--etcd-endpoints", "http://127.0.0.1:2379"]).store_kind_in(true).unwrap(), StoreKind::Etcd);
        let in_pod = if cfg!(feature = "kubernetes") { StoreKind::Kubernetes } else { StoreKind::Embedded };
        assert_eq!(flags(&[]).store_kind_in(true).unwrap(), in_pod);
        assert_eq!(flags(&["--store", "embedded"]).store_kind_in(true).unwrap(), StoreKind::Embedded);
        assert_eq!(flags(&["--store", "kubernetes", "--kubeconfig", "/k"]).store_kind_in(false).unwrap(), StoreKind::Kubernetes);
        let e = flags(&["--store", "etcd"]).store_kind_in(false).unwrap_err().to_string();
        assert!(e.contains("--etcd-endpoints"), "{e}");
        let e = flags(&["--store", "kubernetes", "--etcd-endpoints", "http://x"]).store_kind_in(false).unwrap_err().to_string();
        assert!(e.contains("drop one of them"), "{e}");
        assert_eq!(flags(&["--kubeconfig", "/k"]).store_kind_in(false).unwrap(), StoreKind::Kubernetes);
        let e = flags(&["--store", "embedded", "--kubeconfig", "/k"]).store_kind_in(false).unwrap_err().to_string();
        assert!(e.contains("--store kubernetes"), "{e}");
    }

    #[test]
    fn watch_cilium_pools_reaches_the_kubernetes_store() {
        assert!(!flags(&[]).kube_store_options().watch_cilium_pools);
        assert!(flags(&["--watch-cilium-pools"]).kube_store_options().watch_cilium_pools);
    }
}
