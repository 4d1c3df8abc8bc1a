//! The mutual-TLS certificates of the operator and its agents, issued by
//! the operator into one Secret it owns (`--tls-secret`, in its namespace)
//! instead of by the chart: a chart that generated them (`genCA`) rendered
//! differently every time, which a GitOps tool (Argo CD renders with `helm
//! template` and cannot `lookup`) sees as a change on every sync, and it
//! never renewed them. The pods mount the Secret (kubelet updates the files
//! in place) and reload them without a restart (`volmig_api::tls`).
//!
//! The Secret holds `ca.pem` (every CA a peer may present: during a CA
//! rotation, the new and the previous one), `ca-key.pem` (the key of the
//! newest CA, which signs; no pod mounts it), `agent.pem`/`agent-key.pem`
//! and `master.pem`/`master-key.pem`. [`next`] is one pure step of its
//! life, taken whenever it is due:
//!
//! - none, or unusable: a new CA and both certificates;
//! - a certificate past two thirds of its lifetime (or the agent's name
//!   changed): a new one from the newest CA, at once (every pod trusts that
//!   CA already);
//! - the CA past two thirds of its lifetime: a rotation in three steps,
//!   each only once every pod has had the time to see the previous one
//!   ([`Policy::propagation`]: kubelet updates mounted Secrets within a
//!   minute or two), so an agent and an operator holding different versions
//!   for a moment still trust each other:
//!   1. a new CA joins `ca.pem` (certificates still from the old one);
//!   2. both certificates are issued again by the new CA;
//!   3. the old CA leaves `ca.pem`.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use tracing::{info, warn};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

/// The Secret's keys.
pub const CA: &str = "ca.pem";
pub const CA_KEY: &str = "ca-key.pem";
pub const AGENT: &str = "agent.pem";
pub const AGENT_KEY: &str = "agent-key.pem";
pub const MASTER: &str = "master.pem";
pub const MASTER_KEY: &str = "master-key.pem";
/// When the Secret last changed (unix seconds): the next step of a
/// rotation waits [`Policy::propagation`] after it.
pub const CHANGED_AT: &str = "volmig.io/tls-changed-at";
/// What the last change was, for people.
pub const LAST_STEP: &str = "volmig.io/tls-last-step";
/// The client certificate's name (the agents accept any certificate of the
/// CA; the name says who it is).
pub const MASTER_NAME: &str = "volmig-master";

/// How long things live and how long a change takes to reach every pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// The DNS name of the agent certificate (`--agent-tls-name`).
    pub agent_name: String,
    pub ca_validity: Duration,
    pub cert_validity: Duration,
    /// How long after a change of the Secret every pod has its files.
    pub propagation: Duration,
}

impl Policy {
    pub fn new(agent_name: &str) -> Self {
        Self {
            agent_name: agent_name.into(),
            ca_validity: Duration::from_secs(3650 * 86400),
            cert_validity: Duration::from_secs(90 * 86400),
            propagation: Duration::from_secs(3600),
        }
    }
}

/// The Secret's contents (PEM by key) and when they last changed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Material {
    pub files: BTreeMap<String, String>,
    pub changed_at: i64,
}

/// What to do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Write this (then ask again).
    Write { material: Material, step: String },
    /// Nothing until then (unix seconds).
    Wait(i64),
}

#[derive(Debug, thiserror::Error)]
pub enum IssuerError {
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS Secret {0}: {1}")]
    Api(String, kube::Error),
}

/// A CA of the bundle.
struct Ca {
    pem: String,
    der: Vec<u8>,
    key: Vec<u8>,
    not_before: i64,
    not_after: i64,
}

/// A certificate as issued.
struct Leaf {
    /// Index in the bundle of the CA whose signature it carries.
    issuer: Option<usize>,
    not_before: i64,
    not_after: i64,
    dns: Vec<String>,
}

fn cert(der: &[u8]) -> Option<X509Certificate<'_>> {
    x509_parser::parse_x509_certificate(der)
        .ok()
        .map(|(_, c)| c)
}

/// The PEM blocks of certificates in `s`, each as its text and its DER.
fn pems(s: &str) -> Vec<(String, Vec<u8>)> {
    const END: &str = "-----END CERTIFICATE-----";
    s.split_inclusive(END)
        .filter(|b| b.contains(END))
        .filter_map(|b| {
            let text = format!("{}\n", b.trim_start());
            let (_, p) = x509_parser::pem::parse_x509_pem(text.as_bytes()).ok()?;
            (p.label == "CERTIFICATE").then_some((text, p.contents))
        })
        .collect()
}

fn bundle(m: &Material) -> Vec<Ca> {
    let Some(s) = m.files.get(CA) else {
        return Vec::new();
    };
    pems(s)
        .into_iter()
        .filter_map(|(pem, der)| {
            let c = cert(&der)?;
            let key = c.public_key().subject_public_key.data.to_vec();
            let (not_before, not_after) = (
                c.validity().not_before.timestamp(),
                c.validity().not_after.timestamp(),
            );
            Some(Ca {
                pem,
                der: der.clone(),
                key,
                not_before,
                not_after,
            })
        })
        .collect()
}

fn leaf(m: &Material, key: &str, cas: &[Ca]) -> Option<Leaf> {
    let (_, der) = pems(m.files.get(key)?).into_iter().next()?;
    let c = cert(&der)?;
    let issuer = cas.iter().position(|ca| {
        cert(&ca.der).is_some_and(|ca| c.verify_signature(Some(ca.public_key())).is_ok())
    });
    let dns = c
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(d) => Some(d.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    Some(Leaf {
        issuer,
        not_before: c.validity().not_before.timestamp(),
        not_after: c.validity().not_after.timestamp(),
        dns,
    })
}

fn odt(unix: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(unix).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// Seconds of a duration, as the certificates count them.
fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX / 4)
}

/// Certificates start an hour early: clocks differ.
const SKEW: i64 = 3600;

/// A new CA: its PEM and its key's PEM.
fn new_ca(now: i64, p: &Policy) -> Result<(String, String), IssuerError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let mut dn = DistinguishedName::new();
    // a name of its own, so the old and the new CA of a rotation differ
    dn.push(DnType::CommonName, format!("volmig CA {now}"));
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = odt(now - SKEW);
    params.not_after = odt(now + secs(p.ca_validity));
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A certificate for `name` from the CA `ca_pem` with key `ca_key`; `dns`
/// for the agent's (server) one.
fn new_leaf(
    now: i64,
    p: &Policy,
    ca_pem: &str,
    ca_key: &str,
    ca_not_after: i64,
    name: &str,
    server: bool,
) -> Result<(String, String), IssuerError> {
    let issuer = Issuer::from_ca_cert_pem(ca_pem, KeyPair::from_pem(ca_key)?)?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, name);
    if server {
        params.subject_alt_names = vec![SanType::DnsName(name.to_string().try_into()?)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    } else {
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    }
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.not_before = odt(now - SKEW);
    params.not_after = odt((now + secs(p.cert_validity)).min(ca_not_after));
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Everything new: a CA and both certificates.
fn fresh(now: i64, p: &Policy) -> Result<Material, IssuerError> {
    let (ca, ca_key) = new_ca(now, p)?;
    let ca_not_after = now + secs(p.ca_validity);
    let (agent, agent_key) = new_leaf(now, p, &ca, &ca_key, ca_not_after, &p.agent_name, true)?;
    let (master, master_key) = new_leaf(now, p, &ca, &ca_key, ca_not_after, MASTER_NAME, false)?;
    let files = [
        (CA, ca),
        (CA_KEY, ca_key),
        (AGENT, agent),
        (AGENT_KEY, agent_key),
        (MASTER, master),
        (MASTER_KEY, master_key),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    Ok(Material {
        files,
        changed_at: now,
    })
}

/// When something living from `nb` to `na` is due for renewal: with a
/// third of its life left.
fn renew_at(nb: i64, na: i64) -> i64 {
    na - (na - nb) / 3
}

/// The one next step for the Secret `current` at time `now` (unix seconds).
pub fn next(now: i64, current: Option<&Material>, p: &Policy) -> Result<Next, IssuerError> {
    let write = |material: Material, step: &str| Next::Write {
        material,
        step: step.to_string(),
    };
    let Some(cur) = current else {
        return Ok(write(fresh(now, p)?, "created"));
    };
    let cas = bundle(cur);
    let key = cur
        .files
        .get(CA_KEY)
        .and_then(|k| KeyPair::from_pem(k).ok());
    let signer = key.as_ref().and_then(|k| {
        cas.iter()
            .position(|ca| ca.key == rcgen::PublicKeyData::der_bytes(k))
    });
    let Some(signer) = signer else {
        return Ok(write(
            fresh(now, p)?,
            "created anew: the CA or its key was missing or unusable",
        ));
    };
    let settled = now >= cur.changed_at + secs(p.propagation);
    let settle_at = cur.changed_at + secs(p.propagation);

    // 1. the CA is due: a new one joins the bundle (it signs from now on,
    //    once every pod trusts it)
    let s = &cas[signer];
    if now >= renew_at(s.not_before, s.not_after) {
        let (ca, ca_key) = new_ca(now, p)?;
        let mut m = cur.clone();
        let kept: String = cas
            .iter()
            .filter(|c| c.not_after > now)
            .map(|c| c.pem.as_str())
            .collect();
        m.files.insert(CA.into(), format!("{ca}{kept}"));
        m.files.insert(CA_KEY.into(), ca_key);
        m.changed_at = now;
        return Ok(write(
            m,
            "CA rotation 1/3: a new CA is trusted beside the old one",
        ));
    }

    // 2. certificates: renewed from the signing CA when due, not from it,
    //    or (the agent's) for another name
    let mut m = cur.clone();
    let mut renewed = Vec::new();
    let mut wait_until = i64::MAX;
    for (file, key_file, name, server) in [
        (AGENT, AGENT_KEY, p.agent_name.as_str(), true),
        (MASTER, MASTER_KEY, MASTER_NAME, false),
    ] {
        let l = leaf(cur, file, &cas);
        let usable_key = cur
            .files
            .get(key_file)
            .is_some_and(|k| KeyPair::from_pem(k).is_ok());
        let (due, from_signer) = match &l {
            None => (true, false),
            Some(l) => (
                !usable_key
                    || l.issuer != Some(signer)
                    || now >= renew_at(l.not_before, l.not_after)
                    || (server && l.dns != [name.to_string()]),
                l.issuer == Some(signer),
            ),
        };
        if !due {
            if let Some(l) = &l {
                wait_until = wait_until.min(renew_at(l.not_before, l.not_after));
            }
            continue;
        }
        // From the signing CA is safe at once only if every pod trusts it:
        // it issued the certificate already, or it has been in the bundle
        // long enough; or waiting would let the certificate expire.
        let expires_first = l.as_ref().is_none_or(|l| l.not_after <= settle_at + SKEW);
        if !(from_signer || settled || expires_first) {
            wait_until = wait_until.min(settle_at);
            continue;
        }
        let (c, k) = new_leaf(
            now,
            p,
            &s.pem,
            &cur.files[CA_KEY],
            s.not_after,
            name,
            server,
        )?;
        m.files.insert(file.into(), c);
        m.files.insert(key_file.into(), k);
        renewed.push(file);
    }
    if !renewed.is_empty() {
        m.changed_at = now;
        let rotation = cas.len() > 1;
        let step = if rotation {
            format!(
                "CA rotation 2/3: {} issued by the new CA",
                renewed.join(", ")
            )
        } else {
            format!("renewed {}", renewed.join(", "))
        };
        return Ok(write(m, &step));
    }

    // 3. CAs other than the signer leave the bundle once nothing they
    //    issued is in use any more (expired ones at once)
    if cas.len() > 1 {
        let every_leaf_from_signer = [AGENT, MASTER]
            .iter()
            .all(|f| leaf(cur, f, &cas).is_some_and(|l| l.issuer == Some(signer)));
        let retire = every_leaf_from_signer && settled;
        let keep: Vec<&Ca> = cas
            .iter()
            .enumerate()
            .filter(|(i, c)| *i == signer || (!retire && c.not_after > now))
            .map(|(_, c)| c)
            .collect();
        if keep.len() < cas.len() {
            let mut m = cur.clone();
            m.files.insert(
                CA.into(),
                keep.iter().map(|c| c.pem.as_str()).collect::<String>(),
            );
            m.changed_at = now;
            let step = if retire {
                "CA rotation 3/3: the old CA is no longer trusted"
            } else {
                "an expired CA is no longer trusted"
            };
            return Ok(write(m, step));
        }
        if every_leaf_from_signer {
            wait_until = wait_until.min(settle_at);
        }
        // an old CA expiring is a change too
        for c in &cas {
            wait_until = wait_until.min(c.not_after);
        }
    }
    Ok(Next::Wait(
        wait_until.min(renew_at(s.not_before, s.not_after)),
    ))
}

/// The Secret's material, if it has any.
pub fn material_of(s: &Secret) -> Material {
    let files = s
        .data
        .iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.clone(), String::from_utf8(v.0.clone()).ok()?)))
        .collect();
    let changed_at = s
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(CHANGED_AT))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Material { files, changed_at }
}

fn secret_of(name: &str, ns: &str, m: &Material, step: &str, base: Option<&Secret>) -> Secret {
    let mut meta = base
        .map(|b| b.metadata.clone())
        .unwrap_or_else(|| ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            ..ObjectMeta::default()
        });
    meta.managed_fields = None;
    let labels = meta.labels.get_or_insert_default();
    labels.insert(
        "app.kubernetes.io/managed-by".into(),
        "volmig-operator".into(),
    );
    labels.insert("app.kubernetes.io/part-of".into(), "volmig".into());
    let ann = meta.annotations.get_or_insert_default();
    ann.insert(CHANGED_AT.into(), m.changed_at.to_string());
    ann.insert(LAST_STEP.into(), step.into());
    Secret {
        metadata: meta,
        type_: Some("Opaque".into()),
        data: Some(
            m.files
                .iter()
                .map(|(k, v)| (k.clone(), ByteString(v.clone().into_bytes())))
                .collect(),
        ),
        ..Secret::default()
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(0))
        .unwrap_or(0)
}

/// Brings Secret `ns/name` up to date at time `now`: creates it, renews
/// or rotates what is due (several steps if each is safe at once). Another
/// replica's write in between is no error: the next call sees it. Returns
/// when to look again (unix seconds).
pub async fn ensure(
    client: &Client,
    ns: &str,
    name: &str,
    p: &Policy,
    now: i64,
) -> Result<i64, IssuerError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let api_err = |e| IssuerError::Api(format!("{ns}/{name}"), e);
    // a few steps at most: each write changes what the next one sees
    for _ in 0..4 {
        let existing = api.get_opt(name).await.map_err(api_err)?;
        let current = existing.as_ref().map(material_of);
        let usable = current.as_ref().filter(|m| !m.files.is_empty());
        match next(now, usable, p)? {
            Next::Wait(t) => return Ok(t),
            Next::Write { material, step } => {
                let s = secret_of(name, ns, &material, &step, existing.as_ref());
                let r = match &existing {
                    None => api.create(&PostParams::default(), &s).await.map(|_| ()),
                    Some(_) => api
                        .replace(name, &PostParams::default(), &s)
                        .await
                        .map(|_| ()),
                };
                match r {
                    Ok(()) => info!(secret = %format!("{ns}/{name}"), %step, "TLS certificates"),
                    // another replica wrote first: look at what it wrote
                    Err(kube::Error::Api(ae)) if ae.code == 409 => {}
                    Err(e) => return Err(api_err(e)),
                }
            }
        }
    }
    Ok(now)
}

/// Keeps Secret `ns/name` current for as long as the operator runs: at
/// start-up, then whenever something is due (at least every hour, in case
/// someone edited or deleted it), retrying failures after 30 s.
pub async fn run(client: Client, ns: String, name: String, p: Policy) {
    loop {
        let now = unix_now();
        let wait = match ensure(&client, &ns, &name, &p, now).await {
            Ok(t) => Duration::from_secs(u64::try_from(t - now).unwrap_or(0).clamp(1, 3600)),
            Err(e) => {
                warn!(error = %e, "TLS Secret; retrying in 30 s");
                Duration::from_secs(30)
            }
        };
        tokio::time::sleep(wait).await;
    }
}
