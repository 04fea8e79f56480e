//! Atomic file and directory writes: write under a temporary name in the same folder, fsync, rename.
//! A crash at any point leaves either the old file or the new one, never half of one.

use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

fn temp_name(path: &Path) -> PathBuf {
    sibling(path, "tmp")
}

/// `.NAME.KIND-PID` beside `path`: the writer's process id keeps concurrent writers apart and tells
/// `remove_stale_temps` whose it is.
fn sibling(path: &Path, kind: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{kind}-{}", std::process::id()))
}

/// The process id in a `.NAME.tmp-PID` / `.NAME.old-PID` name, if it is one.
fn temp_owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix('.')?;
    let (_, pid) = rest.rsplit_once(".tmp-").or_else(|| rest.rsplit_once(".old-"))?;
    // Digits only: `parse` alone would take "+12"; an empty id fails to parse.
    pid.bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| pid.parse().ok())
        .flatten()
}

/// Delete the temporaries in `dir` that a writer killed mid-write left behind (a killed checkpoint
/// save leaves a whole model and optimizer state, and a resumed run never reuses the name). Only
/// those of processes no longer running go, so concurrent writers into the same folder keep theirs;
/// where that cannot be checked (no /proc), nothing is deleted. Returns the deleted paths.
pub fn remove_stale_temps(dir: &Path) -> Result<Vec<PathBuf>> {
    let proc = Path::new("/proc");
    if !proc.join("self").exists() {
        return Ok(Vec::new());
    }
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry?;
        let Some(pid) = temp_owner(&entry.file_name().to_string_lossy()) else {
            continue;
        };
        if pid == std::process::id() || proc.join(pid.to_string()).exists() {
            continue;
        }
        let path = entry.path();
        let result = if entry.file_type()?.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        result.with_context(|| format!("deleting {}, left by a killed writer", path.display()))?;
        removed.push(path);
    }
    Ok(removed)
}

/// Write a file atomically with a writer callback that fills the temporary path.
pub fn write_atomic_with(path: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = temp_name(path);
    let result = fill(&tmp).and_then(|_| {
        std::fs::File::open(&tmp)?
            .sync_all()
            .with_context(|| format!("syncing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        sync_parent(path)
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// fsync the directory holding `path`, so that a rename into it survives a crash.
fn sync_parent(path: &Path) -> Result<()> {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::File::open(parent)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing directory {}", parent.display()))
}

pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |tmp| {
        let mut f = std::fs::File::create(tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("writing {}", tmp.display()))?;
        Ok(())
    })
}

/// Build a directory atomically: `fill` writes into a fresh temporary sibling, which is then renamed
/// to `dir`. An existing `dir` is replaced only when `overwrite` is set.
pub fn write_dir_atomic(dir: &Path, overwrite: bool, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if dir.is_file() {
        bail!("{} is a file; give a directory path for the output", dir.display());
    }
    if dir.exists() && !overwrite {
        bail!(
            "{} already exists; choose another output path or pass --overwrite",
            dir.display()
        );
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let tmp = temp_name(dir);
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() {
        let old = sibling(dir, "old");
        std::fs::rename(dir, &old).with_context(|| format!("moving {} aside", dir.display()))?;
        std::fs::rename(&tmp, dir).with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(&tmp, dir).with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))?;
    }
    sync_parent(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_owner_reads_only_temporary_names() {
        assert_eq!(temp_owner(".step-000300.tmp-4242"), Some(4242));
        assert_eq!(temp_owner(".latest.old-17"), Some(17));
        assert_eq!(temp_owner("step-000300"), None);
        assert_eq!(temp_owner("x.tmp-12"), None); // not hidden: not ours
        assert_eq!(temp_owner(".step-000300.tmp-"), None);
        assert_eq!(temp_owner(".a.tmp-12b"), None);
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn stale_temps_of_dead_writers_go_live_ones_stay() -> Result<()> {
        // A pid that surely ran and is gone: a child we started and reaped.
        let mut child = std::process::Command::new("true").spawn()?;
        child.wait()?;
        let dead = child.id();
        let dir = tempfile::tempdir()?;
        let stale_dir = dir.path().join(format!(".step-000300.tmp-{dead}"));
        std::fs::create_dir(&stale_dir)?;
        std::fs::write(stale_dir.join("model.safetensors"), b"partial")?;
        let stale_file = dir.path().join(format!(".latest.tmp-{dead}"));
        std::fs::write(&stale_file, b"step-000300")?;
        let own = dir.path().join(format!(".step-000600.tmp-{}", std::process::id()));
        std::fs::create_dir(&own)?;
        let kept = ["step-000200", "latest"].map(|n| dir.path().join(n));
        std::fs::create_dir(&kept[0])?;
        std::fs::write(&kept[1], b"step-000200")?;

        let mut removed = remove_stale_temps(dir.path())?;
        removed.sort();
        let mut expected = vec![stale_file, stale_dir];
        expected.sort();
        assert_eq!(removed, expected);
        assert!(expected.iter().all(|p| !p.exists()));
        assert!(own.exists() && kept.iter().all(|p| p.exists()));
        Ok(())
    }
}
