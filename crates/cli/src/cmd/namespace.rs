use allot_wire::AnnotateRequest;

use crate::backend::Backend;
use clap::Subcommand;

use crate::output::{Format, Table, print};

#[derive(Subcommand)]
pub enum NamespaceCmd {
    /// Set (KEY=VALUE) or remove (KEY-) annotations of a namespace.
    Annotate {
        namespace: String,
        #[arg(required = true)]
        annotations: Vec<String>,
    },
    /// List annotated namespaces.
    List {
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: Format,
    },
}

/// `KEY=VALUE` sets, `KEY-` removes (kubectl's form).
pub fn parse_annotations(args: &[String]) -> anyhow::Result<AnnotateRequest> {
    let mut req = AnnotateRequest { set: Default::default(), remove: Vec::new() };
    for a in args {
        if let Some((k, v)) = a.split_once('=') {
            anyhow::ensure!(!k.is_empty(), "annotation {a:?} has an empty key");
            req.set.insert(k.to_string(), v.to_string());
        } else if let Some(k) = a.strip_suffix('-').filter(|k| !k.is_empty()) {
            req.remove.push(k.to_string());
        } else {
            anyhow::bail!("annotation {a:?} is neither KEY=VALUE nor KEY- (to remove)");
        }
    }
    Ok(req)
}

pub fn exec(cmd: NamespaceCmd, backend: &Backend) -> anyhow::Result<()> {
    match cmd {
        NamespaceCmd::Annotate { namespace, annotations } => {
            let req = parse_annotations(&annotations)?;
            backend.annotate(&namespace, req)?;
            println!("namespace/{namespace} annotated");
            Ok(())
        }
        NamespaceCmd::List { output } => {
            let list = backend.namespaces()?;
            print(output, &list, || {
                let mut t = Table::new(&["name", "annotations"]);
                for n in &list {
                    let a: Vec<String> = n.metadata.annotations.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    t.row(vec![n.metadata.name.clone(), a.join(",")]);
                }
                t
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_and_remove_forms() {
        let r = parse_annotations(&["ipam.cilium.io/ip-pool=blue".into(), "old-".into()]).unwrap();
        assert_eq!(r.set["ipam.cilium.io/ip-pool"], "blue");
        assert_eq!(r.remove, vec!["old".to_string()]);
        assert!(parse_annotations(&["nokey".into()]).is_err());
        assert!(parse_annotations(&["=v".into()]).is_err());
    }
}
