#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design
//! krew/volmig.yaml, the krew plugin manifest of `kubectl volmig`, has every
//! field krew requires, names this crate's version and binary, and one
//! entry per platform in the form scripts/krew-package fills in.

use std::path::PathBuf;

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn text(v: &Value, what: &str) -> String {
    v.as_str()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| panic!("{what} must be a non-empty string, is {v}"))
        .to_string()
}

#[cfg(feature = "kubectl")]
#[test]
fn the_krew_manifest_has_what_krew_requires() {
    let path = root().join("krew/volmig.yaml");
    let m: Value = serde_saphyr::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(
        m["apiVersion"],
        "krew.googlecontainertools.github.com/v1alpha2"
    );
    assert_eq!(m["kind"], "Plugin");
    // krew: the plugin's name is the file's name and kubectl's subcommand.
    assert_eq!(m["metadata"]["name"], "volmig");
    let spec = &m["spec"];
    let version = text(&spec["version"], "spec.version");
    assert_eq!(
        version,
        format!("v{}", env!("CARGO_PKG_VERSION")),
        "semver with a v, this crate's"
    );
    let short = text(&spec["shortDescription"], "spec.shortDescription");
    assert!(
        short.len() <= 60,
        "krew-index keeps shortDescription short: {short}"
    );
    text(&spec["description"], "spec.description");
    assert!(text(&spec["homepage"], "spec.homepage").starts_with("https://"));
    let platforms = spec["platforms"].as_array().expect("spec.platforms");
    assert!(!platforms.is_empty());
    let mut seen = Vec::new();
    for p in platforms {
        let labels = &p["selector"]["matchLabels"];
        let (os, arch) = (text(&labels["os"], "os"), text(&labels["arch"], "arch"));
        assert!(
            ["linux", "darwin", "windows"].contains(&os.as_str()),
            "{os}"
        );
        assert!(
            ["amd64", "arm64", "arm", "386"].contains(&arch.as_str()),
            "{arch}"
        );
        let uri = text(&p["uri"], "uri");
        assert!(uri.starts_with("https://"), "{uri}");
        assert!(
            uri.ends_with(&format!("/{version}/kubectl-volmig-{os}-{arch}.tar.gz")),
            "{uri}: the archive scripts/krew-package names"
        );
        let sha = text(&p["sha256"], "sha256");
        assert!(
            sha.len() == 64
                && sha
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
            "sha256 must be 64 lower-case hex digits: {sha}"
        );
        assert_eq!(p["bin"], "kubectl-volmig", "the binary kubectl runs");
        let files = p["files"].as_array().expect("files");
        assert!(
            files.iter().any(|f| f["from"] == "kubectl-volmig"),
            "{files:?}"
        );
        // krew-index wants the license in the archive; the packer puts it there.
        assert!(files.iter().any(|f| f["from"] == "LICENSE"), "{files:?}");
        assert!(root().join("LICENSE").is_file(), "the repository's LICENSE");
        seen.push(format!("{os}/{arch}"));
    }
    let n = seen.len();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), n, "one entry per platform: {seen:?}");
    // The packaging script knows the archive names.
    let script = std::fs::read_to_string(root().join("scripts/krew-package")).unwrap();
    assert!(script.contains("archive=kubectl-volmig-$platform.tar.gz"));
}
