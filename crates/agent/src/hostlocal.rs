//! Reads the reference `host-local` IPAM plugin's network directory
//! (`/var/lib/cni/networks/<network>`): one file per address, named by the address and holding
//! `CONTAINERID\r\nIFNAME` (plugins before 0.7 wrote the container ID alone), beside
//! `last_reserved_ip.<range>` and `lock`. allot only reads it, except to remove the lease of a
//! pod whose DEL or GC came to allot under its own network name (`remove_leases`): the old
//! plugin never runs for that pod again.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

/// The ifname assumed for files of old host-local versions that recorded only the container ID
/// (the kubelet always names the pod's interface `eth0`).
pub const DEFAULT_IFNAME: &str = "eth0";

#[derive(Debug, Clone, thiserror::Error)]
pub enum HostLocalError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Unreadable(String),
}

/// One address host-local handed out.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Lease {
    pub ip: IpAddr,
    pub container_id: String,
    pub ifname: String,
}

/// What a directory held.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scan {
    /// The network's name: the directory's own name.
    pub network: String,
    pub leases: Vec<Lease>,
    /// Address files still empty (host-local creates the file, then writes it): read next time.
    pub incomplete: Vec<IpAddr>,
}

impl Scan {
    /// The leases grouped by (container ID, ifname): one allocation per attachment.
    pub fn by_attachment(&self) -> BTreeMap<(String, String), Vec<IpAddr>> {
        let mut out: BTreeMap<(String, String), Vec<IpAddr>> = BTreeMap::new();
        for l in &self.leases {
            out.entry((l.container_id.clone(), l.ifname.clone())).or_default().push(l.ip);
        }
        out
    }
}

/// Parses one address file's content.
pub fn parse_lease(content: &str) -> Option<(String, String)> {
    let mut lines = content.split('\n').map(|l| l.trim_end_matches('\r').trim());
    let id = lines.next().filter(|l| !l.is_empty())?;
    let ifname = lines.next().filter(|l| !l.is_empty()).unwrap_or(DEFAULT_IFNAME);
    Some((id.to_string(), ifname.to_string()))
}

/// Reads a host-local network directory. A directory that does not look like one (missing,
/// the parent `networks/` directory, files that are neither addresses nor host-local's own) is
/// refused with what was found.
pub fn scan(dir: &Path) -> Result<Scan, HostLocalError> {
    let shown = dir.display();
    let meta = std::fs::metadata(dir).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => HostLocalError::Invalid(format!(
            "host-local directory {shown} does not exist: give the network's directory, /var/lib/cni/networks/<network> (or the plugin's dataDir/<network>)"
        )),
        _ => HostLocalError::Unreadable(format!("reading host-local directory {shown}: {e}")),
    })?;
    if !meta.is_dir() {
        return Err(HostLocalError::Invalid(format!("{shown} is not a directory: give host-local's /var/lib/cni/networks/<network>")));
    }
    let network = dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .filter(|n| !n.is_empty())
        .ok_or_else(|| HostLocalError::Invalid(format!("{shown}: cannot tell the network name (the directory's name)")))?;
    let entries = std::fs::read_dir(dir).map_err(|e| HostLocalError::Unreadable(format!("reading host-local directory {shown}: {e}")))?;
    let mut scan = Scan { network, ..Scan::default() };
    let mut subdirs = Vec::new();
    let mut strangers = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| HostLocalError::Unreadable(format!("reading host-local directory {shown}: {e}")))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            subdirs.push(name);
            continue;
        }
        if name == "lock" || name.starts_with("last_reserved_ip") || name.starts_with('.') {
            continue;
        }
        let Ok(ip) = name.parse::<IpAddr>() else {
            strangers.push(name);
            continue;
        };
        let content = match std::fs::read_to_string(entry.path()) {
            Ok(c) => c,
            // Released between listing and reading.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(HostLocalError::Unreadable(format!("reading {}: {e}", entry.path().display()))),
        };
        match parse_lease(&content) {
            Some((container_id, ifname)) => scan.leases.push(Lease { ip, container_id, ifname }),
            None => scan.incomplete.push(ip),
        }
    }
    if scan.leases.is_empty() && scan.incomplete.is_empty() && !subdirs.is_empty() {
        subdirs.sort();
        return Err(HostLocalError::Invalid(format!(
            "{shown} holds directories ({}), not host-local's address files: give one network's directory, e.g. {}/{}",
            subdirs.join(", "),
            shown,
            subdirs[0]
        )));
    }
    if !strangers.is_empty() {
        strangers.sort();
        return Err(HostLocalError::Invalid(format!(
            "{shown} holds files that are not host-local's ({}): is this host-local's network directory? nothing was adopted",
            strangers.join(", ")
        )));
    }
    scan.leases.sort();
    scan.incomplete.sort();
    Ok(scan)
}

/// How long `remove_leases` waits for host-local's lock: host-local holds it for one call; a
/// plugin hung with it must not hang allot's DEL (the lease then stays, not adopted again).
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Removes the address files among `ips` that name (`container_id`, `ifname`), as host-local's
/// DEL would: under its lock (an `flock` on `lock` in the directory, as host-local takes it),
/// leaving `last_reserved_ip.*` alone, then syncs the directory so a crash cannot bring a lease
/// back. Returns the addresses whose file it removed; a file naming another owner stays.
pub fn remove_leases(dir: &Path, container_id: &str, ifname: &str, ips: &[IpAddr]) -> std::io::Result<Vec<IpAddr>> {
    use std::os::unix::fs::OpenOptionsExt;
    let lock = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o600).open(dir.join("lock"))?;
    let started = std::time::Instant::now();
    // Released when `lock` is dropped.
    loop {
        match lock.try_lock() {
            Ok(()) => break,
            Err(std::fs::TryLockError::WouldBlock) if started.elapsed() < LOCK_WAIT => std::thread::sleep(std::time::Duration::from_millis(20)),
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("host-local's lock {} held for more than {LOCK_WAIT:?}", dir.join("lock").display())));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
    }
    let mut removed = Vec::new();
    for ip in ips {
        let path = dir.join(ip.to_string());
        let content = match std::fs::read_to_string(&path) {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if parse_lease(&content).is_some_and(|(id, ifn)| id == container_id && ifn == ifname) {
            std::fs::remove_file(&path)?;
            removed.push(*ip);
        }
    }
    if !removed.is_empty() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_formats() {
        assert_eq!(parse_lease("abc\r\neth0"), Some(("abc".into(), "eth0".into())));
        assert_eq!(parse_lease("abc\nnet1\n"), Some(("abc".into(), "net1".into())));
        assert_eq!(parse_lease("abc"), Some(("abc".into(), "eth0".into())), "pre-0.7 files hold the ID alone");
        assert_eq!(parse_lease(""), None);
        assert_eq!(parse_lease("\r\neth0"), None);
    }

    #[test]
    fn scans_a_directory_and_refuses_others() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("k8s-pod-network");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("lock"), "").unwrap();
        std::fs::write(dir.join("last_reserved_ip.0"), "10.1.0.3").unwrap();
        std::fs::write(dir.join("10.1.0.2"), "c1\r\neth0").unwrap();
        std::fs::write(dir.join("fd00::2"), "c1\r\neth0").unwrap();
        std::fs::write(dir.join("10.1.0.3"), "").unwrap();
        let s = scan(&dir).unwrap();
        assert_eq!(s.network, "k8s-pod-network");
        assert_eq!(s.leases.len(), 2);
        assert_eq!(s.incomplete, vec!["10.1.0.3".parse::<IpAddr>().unwrap()]);
        assert_eq!(s.by_attachment()[&("c1".to_string(), "eth0".to_string())].len(), 2);

        let e = scan(root.path()).unwrap_err().to_string();
        assert!(e.contains("k8s-pod-network") && e.contains("one network's directory"), "{e}");
        let e = scan(&root.path().join("nope")).unwrap_err().to_string();
        assert!(e.contains("does not exist"), "{e}");
        // Only the owner's own files go; host-local's files stay.
        let ip2: IpAddr = "10.1.0.2".parse().unwrap();
        let ip6: IpAddr = "fd00::2".parse().unwrap();
        assert_eq!(remove_leases(&dir, "c2", "eth0", &[ip2]).unwrap(), Vec::<IpAddr>::new());
        assert_eq!(remove_leases(&dir, "c1", "eth0", &[ip2, ip6, "10.1.0.9".parse().unwrap()]).unwrap(), vec![ip2, ip6]);
        assert!(!dir.join("10.1.0.2").exists() && dir.join("last_reserved_ip.0").exists() && dir.join("lock").exists());
        // host-local holds its lock (a running ADD or DEL): the removal waits for it.
        std::fs::write(dir.join("10.1.0.4"), "c4\r\neth0").unwrap();
        let held = std::fs::File::open(dir.join("lock")).unwrap();
        held.lock().unwrap();
        let release = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            drop(held);
        });
        let started = std::time::Instant::now();
        assert_eq!(remove_leases(&dir, "c4", "eth0", &["10.1.0.4".parse().unwrap()]).unwrap().len(), 1);
        assert!(started.elapsed() >= std::time::Duration::from_millis(250), "waited for the lock: {:?}", started.elapsed());
        release.join().unwrap();
        std::fs::write(dir.join("notes.txt"), "x").unwrap();
        let e = scan(&dir).unwrap_err().to_string();
        assert!(e.contains("notes.txt"), "{e}");
    }
}
