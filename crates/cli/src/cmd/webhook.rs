//! `allot webhook`: the validating admission webhook (KKP Cluster rules) over HTTPS.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;

use crate::cmd::agent::{init_logging, parse_duration, shutdown_signal};

#[derive(clap::Args)]
pub struct Args {
    /// Address to serve HTTPS on, e.g. 0.0.0.0:9443.
    #[arg(long, value_name = "ADDR")]
    listen: SocketAddr,
    /// Server certificate chain (PEM). Read again when the file changes.
    #[arg(long, value_name = "FILE")]
    tls_cert: PathBuf,
    /// The certificate's private key (PEM).
    #[arg(long, value_name = "FILE")]
    tls_key: PathBuf,
    /// Largest request body accepted (bytes); larger ones get 413.
    #[arg(long, default_value_t = 3 * 1024 * 1024, value_name = "BYTES")]
    max_body: usize,
    /// Time a client gets for the TLS handshake, the request head, and the body, each.
    #[arg(long, default_value = "10s", value_name = "DURATION")]
    read_timeout: String,
    /// Also serve `POST /validate/ippool`: allot's pool rules for IPPool changes made with
    /// kubectl, checked against the pools and blocks it follows through the Kubernetes API
    /// (`--kubeconfig`, or in-cluster config).
    #[arg(long)]
    ippools: bool,
}

pub fn exec(args: Args, cluster: &crate::backend::ClusterFlags) -> anyhow::Result<()> {
    init_logging();
    let timeout = parse_duration(&args.read_timeout)?;
    let limits = allot_webhook::Limits { max_body: args.max_body, handshake_timeout: timeout, header_timeout: timeout, body_timeout: timeout };
    let tls = allot_webhook::server_config(&args.tls_cert, &args.tls_key).context("loading the TLS certificate")?;
    let mut routes = allot_webhook::Routes::standard();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let (_stop_tx, stop) = tokio::sync::watch::channel(false);
        if args.ippools {
            let client = cluster.kube_client().await?;
            let store = std::sync::Arc::new(
                allot_k8s::KubeStore::connect(client, cluster.kube_store_options()).await.context("following IPPools and IPBlocks")?,
            );
            let view = allot_webhook::ippool::PoolView::default();
            routes = routes.validate(allot_webhook::ippool::PATH, view.validator()).ready_when(view.ready());
            tokio::spawn(async move { view.follow(store, stop).await });
        }
        let listener = allot_webhook::bind(args.listen).await?;
        let addr = listener.local_addr()?;
        let paths: Vec<&str> = routes.paths().collect();
        tracing::info!(%addr, ?paths, "serving admission webhooks over HTTPS");
        allot_webhook::serve(listener, tls, routes, limits, shutdown_signal()).await;
        Ok(())
    })
}
