//! Names the commit a binary was built from, for `outpost --version`: every build says 0.1.0,
//! so an operator could not tell two apart.

use std::process::Command;

fn main() {
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .map(|text| text.trim().to_owned())
        .filter(|commit| !commit.is_empty())
        .unwrap_or_else(|| "unknown commit".to_owned());
    println!("cargo:rustc-env=OUTPOST_COMMIT={commit}");
    // A new commit moves HEAD, or the branch it names (in the common folder of worktrees).
    let git_path = |what: &str| {
        Command::new("git")
            .args(["rev-parse", what])
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map(|out| std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    };
    let watched = [
        git_path("--git-dir").map(|dir| dir.join("HEAD")),
        git_path("--git-common-dir").map(|dir| dir.join("refs/heads")),
        git_path("--git-common-dir").map(|dir| dir.join("packed-refs")),
    ];
    // Only what is there: a path that is not would run this again at every build.
    for path in watched.into_iter().flatten().filter(|path| path.exists()) {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    println!("cargo:rerun-if-changed=build.rs");
}
