//! `allot node switch`: makes a new conflist the one the container runtime uses on this node,
//! keeping the old configs aside for `--rollback`.
//!
//! libcni (containerd, CRI-O) loads the first file by byte order of name among `*.conf`,
//! `*.conflist` and `*.json` in the config directory and skips subdirectories. The new conflist
//! goes in as `00-allot.conflist`; the config the runtime used so far, and any that would sort
//! before allot's, move to `DIR/.allot-rollback/` (a subdirectory, so libcni ignores them; a
//! rename, so they come back byte for byte with their modes and times). Other configs (another
//! tool's network, podman's, say) stay where they are: the runtime no longer picks them. The new
//! file is written aside, synced, renamed into place and the directory synced *before* the old
//! ones move, so at every instant some valid config sorts first.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail, ensure};
use serde::{Deserialize, Serialize};

pub const DEFAULT_CONF_DIR: &str = "/etc/cni/net.d";
pub const ROLLBACK_DIR: &str = ".allot-rollback";
pub const STATE_FILE: &str = "state.json";
pub const INSTALLED_NAME: &str = "00-allot.conflist";

#[derive(clap::Args)]
pub struct Args {
    /// The new CNI conflist to install (validated first).
    #[arg(long, required_unless_present = "rollback")]
    conflist: Option<PathBuf>,
    /// The runtime's CNI config directory.
    #[arg(long, default_value = DEFAULT_CONF_DIR)]
    cni_conf_dir: PathBuf,
    /// Put the old configs back exactly as they were and remove allot's.
    #[arg(long, conflicts_with = "conflist")]
    rollback: bool,
    /// Only list what would be done.
    #[arg(long)]
    dry_run: bool,
}

/// What a switch did, kept in `DIR/.allot-rollback/state.json` for the rollback.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SwitchState {
    /// The file allot installed (in the config directory).
    pub installed: String,
    /// Files moved into the rollback directory: (name there, original name), in move order.
    pub moved: Vec<Moved>,
    /// Unix seconds of the first switch.
    pub switched_at: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Moved {
    pub name: String,
    pub kept_as: String,
}

/// libcni's choice: config files by byte order of name.
pub fn config_files(dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading CNI config directory {}", dir.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        if [".conf", ".conflist", ".json"].iter().any(|ext| name.ends_with(ext)) {
            out.push(name);
        }
    }
    out.sort();
    Ok(out)
}

/// Checks a conflist the way libcni loads it: a JSON object with a name, a cniVersion and a
/// non-empty `plugins` list whose every entry has a `type`.
pub fn validate_conflist(path: &Path, bytes: &[u8]) -> anyhow::Result<serde_json::Value> {
    let shown = path.display();
    let v: serde_json::Value = serde_json::from_slice(bytes).with_context(|| format!("{shown} is not valid JSON"))?;
    let obj = v.as_object().with_context(|| format!("{shown}: a conflist is a JSON object"))?;
    let name = obj.get("name").and_then(|n| n.as_str()).unwrap_or_default();
    ensure!(!name.is_empty(), "{shown}: \"name\" (the network name) is missing or empty");
    let version = obj.get("cniVersion").and_then(|n| n.as_str()).unwrap_or_default();
    ensure!(!version.is_empty(), "{shown}: \"cniVersion\" is missing or empty (e.g. \"1.0.0\")");
    let plugins = obj.get("plugins").and_then(|p| p.as_array());
    let Some(plugins) = plugins.filter(|p| !p.is_empty()) else {
        bail!("{shown}: \"plugins\" is missing or empty: a conflist lists its plugins (a single-plugin .conf is not accepted; wrap it in \"plugins\": [...])");
    };
    for (i, p) in plugins.iter().enumerate() {
        let t = p.get("type").and_then(|t| t.as_str()).unwrap_or_default();
        ensure!(!t.is_empty(), "{shown}: plugins[{i}] has no \"type\"");
    }
    Ok(v)
}

fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("syncing directory {}", dir.display()))
}

/// Writes `bytes` to `dir/name` atomically: a hidden temp file (libcni skips it: no matching
/// extension), fsync, rename, fsync of the directory.
pub fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = dir.join(format!(".{name}.allot-tmp"));
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, dir.join(name))
    };
    write().inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    }).with_context(|| format!("writing {}", dir.join(name).display()))?;
    sync_dir(dir)
}

fn read_state(rollback: &Path) -> anyhow::Result<Option<SwitchState>> {
    let path = rollback.join(STATE_FILE);
    match std::fs::read(&path) {
        Ok(b) => Ok(Some(serde_json::from_slice(&b).with_context(|| format!("{} is unreadable: fix or remove it", path.display()))?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The plan of a switch, as lines; applied when `dry_run` is false.
pub fn switch(conflist: &Path, dir: &Path, dry_run: bool) -> anyhow::Result<Vec<String>> {
    let bytes = std::fs::read(conflist).with_context(|| format!("reading conflist {}", conflist.display()))?;
    validate_conflist(conflist, &bytes)?;
    ensure!(dir.is_dir(), "CNI config directory {} does not exist (give it with --cni-conf-dir)", dir.display());
    let rollback = dir.join(ROLLBACK_DIR);
    let earlier = read_state(&rollback)?;
    let ours_installed = earlier.is_some();
    let mut state = earlier.unwrap_or_else(|| SwitchState { installed: INSTALLED_NAME.into(), moved: vec![], switched_at: now_unix() });
    let files = config_files(dir)?;
    let mut plan = Vec::new();
    let current = std::fs::read(dir.join(&state.installed)).ok();
    if current.as_deref() != Some(&bytes[..]) {
        plan.push(format!("install {} as {}", conflist.display(), dir.join(&state.installed).display()));
    }
    // A file under allot's name that allot did not write is kept aside too (linked before the
    // new one replaces it), unless it already is the new conflist. A switch killed after
    // recording that and before linking left it in place: it is linked now.
    let unlinked = state.moved.iter().find(|m| m.name == state.installed && !rollback.join(&m.kept_as).exists()).cloned();
    let differs = current.is_some() && current.as_deref() != Some(&bytes[..]);
    let foreign_installed = differs && !ours_installed;
    if let (Some(m), true) = (&unlinked, differs) {
        plan.push(format!("keep aside {} -> {}", dir.join(&m.name).display(), rollback.join(&m.kept_as).display()));
    }
    // The runtime's choice so far, whatever would sort before allot's, and a config moved
    // before that the old CNI's installer wrote again.
    let previous = files.first().filter(|f| !(ours_installed && **f == state.installed)).cloned();
    let others: Vec<&String> = files
        .iter()
        .filter(|f| {
            if **f == state.installed {
                foreign_installed
            } else {
                f.as_str() < state.installed.as_str() || previous.as_ref() == Some(*f) || state.moved.iter().any(|m| m.name == **f)
            }
        })
        .collect();
    let mut moves = Vec::new();
    for name in others {
        // A file of the same name kept earlier (the old CNI's installer wrote it again) is kept
        // beside it under a numbered name; the first one is the one rollback restores.
        let mut kept_as = name.clone();
        let mut n = 1;
        while rollback.join(&kept_as).exists() || moves.iter().any(|m: &Moved| m.kept_as == kept_as) {
            n += 1;
            kept_as = format!("{name}.{n}");
        }
        plan.push(format!("move aside {} -> {}", dir.join(name).display(), rollback.join(&kept_as).display()));
        moves.push(Moved { name: name.clone(), kept_as });
    }
    if plan.is_empty() {
        plan.push(format!("nothing to do: {} is installed and no other config is left in {}", state.installed, dir.display()));
        return Ok(plan);
    }
    if dry_run {
        return Ok(plan);
    }
    std::fs::create_dir_all(&rollback).with_context(|| format!("creating {}", rollback.display()))?;
    // The state first: a switch killed half way can still be rolled back.
    state.moved.extend(moves.iter().cloned());
    write_atomically(&rollback, STATE_FILE, &serde_json::to_vec_pretty(&state)?)?;
    let link = unlinked.filter(|_| differs);
    for m in moves.iter().chain(link.iter()).filter(|m| m.name == state.installed) {
        std::fs::hard_link(dir.join(&m.name), rollback.join(&m.kept_as))
            .with_context(|| format!("keeping {} aside", dir.join(&m.name).display()))?;
    }
    if current.as_deref() != Some(&bytes[..]) {
        write_atomically(dir, &state.installed, &bytes)?;
    }
    for m in moves.iter().filter(|m| m.name != state.installed) {
        std::fs::rename(dir.join(&m.name), rollback.join(&m.kept_as))
            .with_context(|| format!("moving {} aside", dir.join(&m.name).display()))?;
    }
    sync_dir(&rollback)?;
    sync_dir(dir)?;
    let first = config_files(dir)?;
    ensure!(
        first.first() == Some(&state.installed),
        "after the switch, {} sorts before {} in {}: remove it (the runtime would use it)",
        first.first().map_or("nothing", String::as_str),
        state.installed,
        dir.display()
    );
    Ok(plan)
}

/// Puts back every moved config (refusing if a file of that name is in the way) and removes
/// allot's.
pub fn rollback(dir: &Path, dry_run: bool) -> anyhow::Result<Vec<String>> {
    let rollback = dir.join(ROLLBACK_DIR);
    let Some(state) = read_state(&rollback)? else {
        bail!("no switch to roll back in {}: {} is missing", dir.display(), rollback.join(STATE_FILE).display());
    };
    let mut plan = Vec::new();
    // The first file kept under each name is the original; later copies are dropped.
    let mut restore: Vec<&Moved> = Vec::new();
    for m in &state.moved {
        if !restore.iter().any(|r| r.name == m.name) {
            restore.push(m);
        }
    }
    let mut blocked = Vec::new();
    let mut never_moved = Vec::new();
    for m in &restore {
        let kept = rollback.join(&m.kept_as).exists();
        if !kept && dir.join(&m.name).exists() {
            // A switch killed after writing its state and before this move: still in place.
            never_moved.push(m.name.clone());
            plan.push(format!("keep {} (never moved)", dir.join(&m.name).display()));
            continue;
        }
        if !kept {
            blocked.push(format!("{} is missing from {}", m.kept_as, rollback.display()));
        } else if m.name != state.installed && dir.join(&m.name).exists() {
            blocked.push(format!("{} exists again in {}", m.name, dir.display()));
        }
        plan.push(format!("restore {} -> {}", rollback.join(&m.kept_as).display(), dir.join(&m.name).display()));
    }
    ensure!(blocked.is_empty(), "rollback refused, nothing changed: {} (move it away, then roll back again)", blocked.join("; "));
    // A file of another tool's under allot's name comes back in its place instead.
    let reinstated = restore.iter().any(|m| m.name == state.installed);
    if !reinstated {
        plan.push(format!("remove {}", dir.join(&state.installed).display()));
    }
    if dry_run {
        return Ok(plan);
    }
    // The old ones back first (allot's still sorts first meanwhile), then allot's goes.
    for m in restore.iter().filter(|m| !never_moved.contains(&m.name)) {
        std::fs::rename(rollback.join(&m.kept_as), dir.join(&m.name))
            .with_context(|| format!("restoring {}", dir.join(&m.name).display()))?;
    }
    sync_dir(dir)?;
    if !reinstated {
        match std::fs::remove_file(dir.join(&state.installed)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", dir.join(&state.installed).display())),
        }
    }
    sync_dir(dir)?;
    for m in state.moved.iter().filter(|m| !restore.iter().any(|r| r.kept_as == m.kept_as)) {
        let _ = std::fs::remove_file(rollback.join(&m.kept_as));
    }
    std::fs::remove_file(rollback.join(STATE_FILE)).with_context(|| format!("removing {}", rollback.join(STATE_FILE).display()))?;
    let _ = std::fs::remove_dir(&rollback);
    sync_dir(dir)?;
    Ok(plan)
}

pub fn exec(args: Args) -> anyhow::Result<()> {
    let plan = if args.rollback {
        rollback(&args.cni_conf_dir, args.dry_run)?
    } else {
        switch(args.conflist.as_deref().expect("clap requires it"), &args.cni_conf_dir, args.dry_run)?
    };
    let prefix = if args.dry_run { "would " } else { "" };
    for line in plan {
        println!("{prefix}{line}");
    }
    if args.dry_run {
        println!("dry run: nothing changed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_what_is_wrong() {
        let p = Path::new("x.conflist");
        assert!(validate_conflist(p, b"{").unwrap_err().to_string().contains("not valid JSON"));
        let e = validate_conflist(p, br#"{"cniVersion":"1.0.0","plugins":[{"type":"bridge"}]}"#).unwrap_err();
        assert!(e.to_string().contains("\"name\""), "{e}");
        let e = validate_conflist(p, br#"{"name":"n","plugins":[{"type":"bridge"}]}"#).unwrap_err();
        assert!(e.to_string().contains("cniVersion"), "{e}");
        let e = validate_conflist(p, br#"{"name":"n","cniVersion":"1.0.0","plugins":[]}"#).unwrap_err();
        assert!(e.to_string().contains("plugins"), "{e}");
        let e = validate_conflist(p, br#"{"name":"n","cniVersion":"1.0.0","plugins":[{"x":1}]}"#).unwrap_err();
        assert!(e.to_string().contains("plugins[0]"), "{e}");
        validate_conflist(p, br#"{"name":"n","cniVersion":"1.0.0","plugins":[{"type":"bridge"}]}"#).unwrap();
    }

    #[test]
    fn libcni_order_and_extensions() {
        let d = tempfile::tempdir().unwrap();
        for n in ["10-b.conf", "05-a.conflist", "99.json", "README", "x.conf.bak", "00-z.conflist"] {
            std::fs::write(d.path().join(n), "{}").unwrap();
        }
        std::fs::create_dir(d.path().join("00-dir.conf")).unwrap();
        assert_eq!(config_files(d.path()).unwrap(), vec!["00-z.conflist", "05-a.conflist", "10-b.conf", "99.json"]);
    }
}
