//! Where the CLI's cluster-wide commands go: the local agent's socket, or etcd directly.

use allot_client::Client;
use allot_wire::{
    AnnotateRequest, ApplyRequest, ApplyResult, NamespaceResource, NodeResource, PoolResource, Status,
};

#[cfg(feature = "etcd")]
use allot_store::Store;

// One backend per CLI run: the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Backend {
    Agent(Client),
    #[cfg(feature = "etcd")]
    Etcd { store: allot_store::EtcdStore, rt: tokio::runtime::Runtime },
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
        if flags.etcd_endpoints.is_empty() {
            return Ok(Backend::Agent(client));
        }
        #[cfg(feature = "etcd")]
        {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let store = rt.block_on(allot_store::EtcdStore::connect(&flags.config()?))?;
            Ok(Backend::Etcd { store, rt })
        }
        #[cfg(not(feature = "etcd"))]
        anyhow::bail!("this allot was built without the etcd feature")
    }

    pub fn pools(&self) -> anyhow::Result<Vec<PoolResource>> {
        match self {
            Backend::Agent(c) => Ok(c.get("/v1/pools")?),
            #[cfg(feature = "etcd")]
            Backend::Etcd { store, rt } => {
                Ok(rt.block_on(store.pools())?.into_iter().map(allot_store::pool_resource).collect())
            }
        }
    }

    pub fn pool(&self, name: &str) -> anyhow::Result<PoolResource> {
        match self {
            Backend::Agent(c) => Ok(c.get(&format!("/v1/pools/{name}"))?),
            #[cfg(feature = "etcd")]
            Backend::Etcd { .. } => self
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
            Backend::Etcd { store, rt } => {
                let pools: Vec<_> = pools.into_iter().map(allot_store::pool_from_resource).collect();
                let names: Vec<String> = pools.iter().map(|p| p.name.clone()).collect();
                let actions = rt.block_on(store.apply_pools(pools))?;
                Ok(names.into_iter().zip(actions).map(|(name, action)| ApplyResult { name, action }).collect())
            }
        }
    }

    pub fn delete_pool(&self, name: &str) -> anyhow::Result<()> {
        match self {
            Backend::Agent(c) => c.delete::<serde_json::Value>(&format!("/v1/pools/{name}")).map(|_| ()).map_err(Into::into),
            #[cfg(feature = "etcd")]
            Backend::Etcd { store, rt } => Ok(rt.block_on(store.delete_pool(name))?),
        }
    }

    pub fn nodes(&self) -> anyhow::Result<Vec<NodeResource>> {
        match self {
            Backend::Agent(c) => Ok(c.get("/v1/nodes")?),
            #[cfg(feature = "etcd")]
            Backend::Etcd { store, rt } => rt.block_on(async {
                let grants = store.grants().await?;
                Ok(store.nodes().await?.iter().map(|n| allot_store::node_resource(n, &grants)).collect())
            }),
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
            #[cfg(feature = "etcd")]
            (Backend::Etcd { .. }, None) => anyhow::bail!("name the node: with --etcd-endpoints there is no local node"),
            #[cfg(feature = "etcd")]
            (Backend::Etcd { .. }, Some(name)) => self
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
        }
    }

    pub fn namespaces(&self) -> anyhow::Result<Vec<NamespaceResource>> {
        match self {
            Backend::Agent(c) => Ok(c.get("/v1/namespaces")?),
            #[cfg(feature = "etcd")]
            Backend::Etcd { store, rt } => Ok(rt
                .block_on(store.namespaces())?
                .into_iter()
                .map(|(name, annotations)| NamespaceResource { metadata: allot_wire::ObjectMeta { name, annotations } })
                .collect()),
        }
    }

    /// The agent's client, for commands that only a node's agent can answer.
    pub fn agent(&self, what: &str) -> anyhow::Result<&Client> {
        match self {
            Backend::Agent(c) => Ok(c),
            #[cfg(feature = "etcd")]
            Backend::Etcd { .. } => {
                anyhow::bail!("{what} lives on each node: leave out --etcd-endpoints and point --socket at that node's agent")
            }
        }
    }
}
