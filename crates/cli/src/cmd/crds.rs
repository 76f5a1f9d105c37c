//! `allot crds`: the CustomResourceDefinitions allot needs, generated from the Rust types, as
//! YAML for `kubectl apply -f -`. `deploy/crds/allot.dev.yaml` is this output, checked by a test.

#[derive(clap::Args)]
pub struct Args {}

pub fn exec(_args: Args) -> anyhow::Result<()> {
    print!("{}", allot_k8s::crds_yaml());
    Ok(())
}
