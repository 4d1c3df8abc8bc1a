//! `volmig certs`: a CA and the server/client certificates for the agent's
//! mTLS, for local mode and development (clusters use the Helm chart or
//! cert-manager).

use std::net::IpAddr;
use std::path::Path;

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

fn leaf(
    name: &str,
    hosts: &[String],
    client: bool,
    ca: &CertifiedIssuer<'_, KeyPair>,
) -> anyhow::Result<(String, String)> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name.push(DnType::CommonName, name);
    for h in hosts {
        p.subject_alt_names.push(match h.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(h.clone().try_into()?),
        });
    }
    p.extended_key_usages = vec![if client {
        ExtendedKeyUsagePurpose::ClientAuth
    } else {
        ExtendedKeyUsagePurpose::ServerAuth
    }];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, ca)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Writes ca.pem, agent.pem/agent-key.pem (server, for `hosts`) and
/// master.pem/master-key.pem (client) into `dir`.
pub fn generate(dir: &Path, hosts: &[String]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "volmig CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;
    let (agent, agent_key) = leaf("volmig-agent", hosts, false, &ca)?;
    let (master, master_key) = leaf("volmig-master", &[], true, &ca)?;
    for (name, data) in [
        ("ca.pem", ca.pem()),
        ("agent.pem", agent),
        ("agent-key.pem", agent_key),
        ("master.pem", master),
        ("master-key.pem", master_key),
    ] {
        let p = dir.join(name);
        std::fs::write(&p, data).with_context(|| format!("writing {}", p.display()))?;
        if name.ends_with("key.pem") {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))?;
        }
    }
    Ok(())
}
