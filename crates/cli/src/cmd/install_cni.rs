//! `allot install-cni`: what the agent DaemonSet's init container runs (the image has no shell).
//! Copies `allot-ipam` into the host's CNI bin dir and, unless chaining into another CNI, a
//! conflist into the host's CNI config dir. Each file is written beside its target, fsynced and
//! renamed into place, so a runtime never execs a half-copied plugin or reads half a conflist.
//! Everything is checked before the first write: a bad input changes nothing.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;

#[derive(clap::Args)]
pub struct Args {
    /// The plugin to install (default: `allot-ipam` beside this `allot` binary).
    #[arg(long, value_name = "PATH")]
    plugin: Option<PathBuf>,
    /// Where the container runtime looks for CNI plugins (the host's, mounted).
    #[arg(long, default_value = "/opt/cni/bin", value_name = "DIR")]
    bin_dir: PathBuf,
    /// Where the container runtime reads CNI configs (the host's, mounted).
    #[arg(long, default_value = "/etc/cni/net.d", value_name = "DIR")]
    conf_dir: PathBuf,
    /// A conflist to install into --conf-dir under its own file name; it must use allot-ipam.
    /// Leave it out when allot's ipam is chained into another CNI's conflist.
    #[arg(long, value_name = "FILE")]
    conflist: Option<PathBuf>,
}

pub fn exec(args: Args) -> anyhow::Result<()> {
    let plugin = match args.plugin {
        Some(p) => p,
        None => std::env::current_exe()
            .context("finding this binary's directory (give --plugin)")?
            .with_file_name("allot-ipam"),
    };
    for line in install(&plugin, &args.bin_dir, &args.conf_dir, args.conflist.as_deref())? {
        println!("{line}");
    }
    Ok(())
}

/// Installs and returns one line per file written.
pub fn install(plugin: &Path, bin_dir: &Path, conf_dir: &Path, conflist: Option<&Path>) -> anyhow::Result<Vec<String>> {
    // Read and check everything first.
    let plugin_bytes = std::fs::read(plugin)
        .with_context(|| format!("reading the plugin {}: give the path of allot-ipam with --plugin", plugin.display()))?;
    anyhow::ensure!(
        plugin_bytes.starts_with(b"\x7fELF"),
        "{} is not an executable (no ELF header): give the allot-ipam binary with --plugin",
        plugin.display()
    );
    let conf = match conflist {
        Some(path) => {
            let text = std::fs::read(path).with_context(|| format!("reading the conflist {}", path.display()))?;
            check_conflist(&text).with_context(|| format!("conflist {}", path.display()))?;
            let name = path.file_name().context("the conflist path has no file name")?.to_owned();
            Some((text, name))
        }
        None => None,
    };
    for dir in std::iter::once(bin_dir).chain(conf.as_ref().map(|_| conf_dir)) {
        anyhow::ensure!(dir.is_dir(), "{} is not a directory: mount the host's directory there", dir.display());
    }

    let mut done = Vec::new();
    let target = bin_dir.join("allot-ipam");
    write_atomic(&target, &plugin_bytes, 0o755)?;
    done.push(format!("installed {}", target.display()));
    if let Some((text, name)) = conf {
        let target = conf_dir.join(name);
        write_atomic(&target, &text, 0o644)?;
        done.push(format!("installed {}", target.display()));
    }
    Ok(done)
}

/// A conflist a runtime will load and that hands addresses to allot: JSON with `cniVersion`,
/// `name`, and a non-empty `plugins` list of which one has `ipam.type` `allot-ipam`.
pub fn check_conflist(text: &[u8]) -> anyhow::Result<()> {
    let v: serde_json::Value = serde_json::from_slice(text).context("not valid JSON")?;
    for key in ["cniVersion", "name"] {
        anyhow::ensure!(v.get(key).and_then(|s| s.as_str()).is_some_and(|s| !s.is_empty()), "{key:?} is missing or not a string");
    }
    let plugins = v.get("plugins").and_then(|p| p.as_array()).filter(|p| !p.is_empty());
    let plugins = plugins.context("\"plugins\" must be a non-empty list (a .conflist, not a single-plugin .conf)")?;
    let uses_allot = plugins.iter().any(|p| p.pointer("/ipam/type").and_then(|t| t.as_str()) == Some("allot-ipam"));
    anyhow::ensure!(uses_allot, "no plugin has \"ipam\": {{\"type\": \"allot-ipam\"}}: pods would not get addresses from allot");
    Ok(())
}

/// Writes beside `target`, fsyncs, renames over it, and fsyncs the directory.
fn write_atomic(target: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let dir = target.parent().context("target has no directory")?;
    let name = target.file_name().context("target has no file name")?.to_string_lossy();
    let tmp = dir.join(format!(".{name}.allot-tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes).with_context(|| format!("writing {}", tmp.display()))?;
        // The umask may have narrowed the mode.
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.sync_all().with_context(|| format!("fsync {}", tmp.display()))?;
        std::fs::rename(&tmp, target).with_context(|| format!("renaming {} to {}", tmp.display(), target.display()))?;
        std::fs::File::open(dir)?.sync_all().with_context(|| format!("fsync {}", dir.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const CONFLIST: &str = r#"{"cniVersion":"1.0.0","name":"allot","plugins":[{"type":"ptp","ipam":{"type":"allot-ipam"},"capabilities":{"io.kubernetes.cri.pod-annotations":true}}]}"#;

    struct Host {
        _dir: tempfile::TempDir,
        plugin: PathBuf,
        bin: PathBuf,
        conf: PathBuf,
        conflist: PathBuf,
    }

    fn host() -> Host {
        let dir = tempfile::tempdir().unwrap();
        let plugin = dir.path().join("allot-ipam-src");
        std::fs::write(&plugin, b"\x7fELF plugin v2").unwrap();
        let (bin, conf) = (dir.path().join("bin"), dir.path().join("net.d"));
        std::fs::create_dir(&bin).unwrap();
        std::fs::create_dir(&conf).unwrap();
        let conflist = dir.path().join("10-allot.conflist");
        std::fs::write(&conflist, CONFLIST).unwrap();
        Host { _dir: dir, plugin, bin, conf, conflist }
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
        v.sort();
        v
    }

    #[test]
    fn installs_plugin_and_conflist_replacing_old_ones_with_modes_and_no_temp_files() {
        let h = host();
        std::fs::write(h.bin.join("allot-ipam"), b"\x7fELF plugin v1").unwrap();
        let done = install(&h.plugin, &h.bin, &h.conf, Some(&h.conflist)).unwrap();
        assert_eq!(done.len(), 2, "{done:?}");
        assert_eq!(std::fs::read(h.bin.join("allot-ipam")).unwrap(), b"\x7fELF plugin v2");
        assert_eq!(std::fs::metadata(h.bin.join("allot-ipam")).unwrap().permissions().mode() & 0o777, 0o755);
        assert_eq!(std::fs::read_to_string(h.conf.join("10-allot.conflist")).unwrap(), CONFLIST);
        assert_eq!(std::fs::metadata(h.conf.join("10-allot.conflist")).unwrap().permissions().mode() & 0o777, 0o644);
        assert_eq!(files(&h.bin), ["allot-ipam"]);
        assert_eq!(files(&h.conf), ["10-allot.conflist"]);
    }

    #[test]
    fn chained_mode_installs_only_the_plugin() {
        let h = host();
        install(&h.plugin, &h.bin, &h.conf, None).unwrap();
        assert_eq!(files(&h.bin), ["allot-ipam"]);
        assert!(files(&h.conf).is_empty());
    }

    #[test]
    fn bad_inputs_are_refused_with_a_reason_and_write_nothing() {
        let h = host();
        let bad = |name: &str, text: &str| {
            let p = h.conf.parent().unwrap().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let cases: Vec<(PathBuf, Option<PathBuf>, PathBuf, &str)> = vec![
            (h.plugin.clone(), Some(bad("a.conflist", "{not json")), h.bin.clone(), "not valid JSON"),
            (h.plugin.clone(), Some(bad("b.conflist", r#"{"cniVersion":"1.0.0","name":"x","type":"ptp"}"#)), h.bin.clone(), "non-empty list"),
            (
                h.plugin.clone(),
                Some(bad("c.conflist", r#"{"cniVersion":"1.0.0","name":"x","plugins":[{"type":"ptp","ipam":{"type":"host-local"}}]}"#)),
                h.bin.clone(),
                "allot-ipam",
            ),
            (h.plugin.clone(), Some(bad("d.conflist", r#"{"name":"x","plugins":[{"ipam":{"type":"allot-ipam"}}]}"#)), h.bin.clone(), "cniVersion"),
            (h.conflist.clone(), None, h.bin.clone(), "no ELF header"),
            (h.plugin.with_file_name("absent"), None, h.bin.clone(), "--plugin"),
            (h.plugin.clone(), None, h.bin.join("missing"), "not a directory"),
        ];
        for (plugin, conflist, bin, want) in cases {
            let e = install(&plugin, &bin, &h.conf, conflist.as_deref()).expect_err(want);
            assert!(format!("{e:#}").contains(want), "want {want:?} in {e:#}");
            assert!(files(&h.bin).is_empty(), "{want}: wrote {:?}", files(&h.bin));
            assert!(files(&h.conf).is_empty(), "{want}: wrote {:?}", files(&h.conf));
        }
    }

    /// The conflist deploy/ ships is one install-cni accepts.
    #[test]
    fn the_deployed_conflist_passes_the_check() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/components/conflist/05-allot.conflist");
        check_conflist(&std::fs::read(&path).unwrap()).unwrap();
    }
}
