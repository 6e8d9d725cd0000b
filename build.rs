//! Names the commit a binary was built from, for `outpost --version`: every build says 0.1.0,
//! so an operator could not tell two apart. `OUTPOST_COMMIT`, when set, names it (a build
//! from a copy without git's history); else git does, when this folder is the top of its
//! checkout (not a copy inside some other repository).

use std::path::{Path, PathBuf};
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    Command::new("git")
        .args(args)
        .output()
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .map(|text| text.trim().to_owned())
        .filter(|text| !text.is_empty())
}

fn main() {
    println!("cargo:rerun-if-env-changed=OUTPOST_COMMIT");
    println!("cargo:rerun-if-changed=build.rs");
    let here = std::env::var("CARGO_MANIFEST_DIR").map(PathBuf::from);
    let top = git(&["rev-parse", "--show-toplevel"]).map(PathBuf::from);
    let ours = match (&here, &top) {
        (Ok(here), Some(top)) => same_folder(here, top),
        _ => false,
    };
    let commit = std::env::var("OUTPOST_COMMIT")
        .ok()
        .filter(|commit| !commit.trim().is_empty())
        .or_else(|| {
            ours.then(|| git(&["rev-parse", "--short=12", "HEAD"]))
                .flatten()
        })
        .unwrap_or_else(|| "unknown commit".to_owned());
    println!("cargo:rustc-env=OUTPOST_COMMIT={commit}");
    if !ours {
        return;
    }
    // A new commit moves HEAD, or the branch it names (in the common folder of worktrees).
    let common = git(&["rev-parse", "--git-common-dir"]).map(PathBuf::from);
    let watched = [
        git(&["rev-parse", "--git-dir"]).map(|dir| PathBuf::from(dir).join("HEAD")),
        common.as_ref().map(|dir| dir.join("refs/heads")),
        common.as_ref().map(|dir| dir.join("packed-refs")),
    ];
    // Only what is there: a path that is not would run this again at every build.
    for path in watched.into_iter().flatten().filter(|path| path.exists()) {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}

fn same_folder(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}
