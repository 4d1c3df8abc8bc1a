#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design
//! The operator's certificates over months of simulated time: renewed
//! before they expire, and across CA rotations an agent and an operator
//! holding any two versions of the Secret that kubelet may show them at the
//! same moment trust each other (checked with rustls' own verifiers at the
//! simulated time). And the Secret in the (fake) API server: created once,
//! left alone while nothing is due, within the operator's RBAC.

use std::sync::Arc;
use std::time::Duration;

use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use volmig_operator::rbac;
use volmig_operator::tls_issuer::{
    AGENT, AGENT_KEY, CA, CA_KEY, MASTER, MASTER_KEY, Material, Next, Policy, ensure, next,
};
use volmig_testkit::fake_api::{FakeApi, OPERATOR};

const DAY: i64 = 86400;
const START: i64 = 1_800_000_000;

fn policy(propagation: i64) -> Policy {
    Policy {
        agent_name: "volmig-agent".into(),
        ca_validity: Duration::from_secs(30 * DAY as u64),
        cert_validity: Duration::from_secs(6 * DAY as u64),
        propagation: Duration::from_secs(propagation as u64),
    }
}

/// Every version of the Secret from `START` to `until`, with when it was
/// written and the step.
fn history(p: &Policy, until: i64) -> Vec<(i64, Material, String)> {
    let mut t = START;
    let mut cur: Option<Material> = None;
    let mut out = Vec::new();
    let mut n = 0;
    while t < until {
        n += 1;
        assert!(n < 10_000, "no progress at {t}");
        match next(t, cur.as_ref(), p).unwrap() {
            Next::Write { material, step } => {
                assert_ne!(
                    Some(&material),
                    cur.as_ref(),
                    "a write that changes nothing"
                );
                out.push((t, material.clone(), step));
                cur = Some(material);
            }
            Next::Wait(u) => {
                assert!(u > t, "waits for the past ({u} at {t})");
                t = u;
            }
        }
    }
    out
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(m: &Material) -> Arc<RootCertStore> {
    let mut r = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(m.files[CA].as_bytes()) {
        r.add(c.unwrap()).unwrap();
    }
    Arc::new(r)
}

fn leaf(m: &Material, key: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(m.files[key].as_bytes()).unwrap()
}

fn at(t: i64) -> UnixTime {
    UnixTime::since_unix_epoch(Duration::from_secs(t as u64))
}

/// Whether an agent holding `agent` and an operator holding `master` reach
/// each other at `t`: the operator verifies the agent's server certificate
/// with its CAs, and the agent the operator's client certificate with its.
fn reach(agent: &Material, master: &Material, t: i64) -> Result<(), String> {
    let server = WebPkiServerVerifier::builder_with_provider(roots(master), provider())
        .build()
        .unwrap();
    server
        .verify_server_cert(
            &leaf(agent, AGENT),
            &[],
            &ServerName::try_from("volmig-agent").unwrap(),
            &[],
            at(t),
        )
        .map_err(|e| format!("the operator refuses the agent: {e}"))?;
    let client = WebPkiClientVerifier::builder_with_provider(roots(agent), provider())
        .build()
        .unwrap();
    client
        .verify_client_cert(&leaf(master, MASTER), &[], at(t))
        .map_err(|e| format!("the agent refuses the operator: {e}"))?;
    Ok(())
}

/// Every pair of versions kubelet may show two pods at the same moment (a
/// version lives from its write until `window` after the next one) must
/// reach each other, both ways round, at the start and the end of their
/// overlap. The failures, described.
fn violations(h: &[(i64, Material, String)], window: i64, until: i64) -> Vec<String> {
    let live: Vec<(i64, i64)> = h
        .iter()
        .enumerate()
        .map(|(k, (t, _, _))| (*t, h.get(k + 1).map_or(until, |n| n.0 + window)))
        .collect();
    let mut bad = Vec::new();
    for (i, (si, ei)) in live.iter().enumerate() {
        for (j, (sj, ej)) in live.iter().enumerate() {
            let (from, to) = (*si.max(sj), (*ei).min(*ej) - 1);
            if from > to {
                continue;
            }
            for t in [from, to] {
                if let Err(e) = reach(&h[i].1, &h[j].1, t) {
                    bad.push(format!(
                        "agent at version {i} ({}), operator at {j} ({}), day {:.2}: {e}",
                        h[i].2,
                        h[j].2,
                        (t - START) as f64 / DAY as f64
                    ));
                }
            }
        }
    }
    bad
}

#[test]
fn renewals_and_ca_rotations_never_break_trust() {
    let propagation = 2 * 3600;
    let until = START + 75 * DAY;
    let h = history(&policy(propagation), until);
    let steps: Vec<&str> = h.iter().map(|(_, _, s)| s.as_str()).collect();
    // what happened: created, certificates renewed, the CA rotated three
    // times (a 30-day CA, renewed 20 days in), each rotation in its three
    // steps, in order
    assert_eq!(steps[0], "created");
    for k in 1..=3 {
        let n = steps
            .iter()
            .filter(|s| s.starts_with(&format!("CA rotation {k}/3")))
            .count();
        assert_eq!(n, 3, "rotation step {k}: {steps:#?}");
    }
    assert!(steps.iter().any(|s| s.starts_with("renewed")), "{steps:#?}");
    let r1 = steps
        .iter()
        .position(|s| s.starts_with("CA rotation 1/3"))
        .unwrap();
    assert!(steps[r1 + 1].starts_with("CA rotation 2/3"), "{steps:#?}");
    assert!(steps[r1 + 2].starts_with("CA rotation 3/3"), "{steps:#?}");
    // each step of a rotation waited for the previous one to reach every pod
    assert!(h[r1 + 1].0 - h[r1].0 >= propagation && h[r1 + 2].0 - h[r1 + 1].0 >= propagation);

    let bad = violations(&h, propagation, until);
    assert!(
        bad.is_empty(),
        "{} failures:\n{}",
        bad.len(),
        bad.join("\n")
    );

    // every version holds what the pods mount, and the CA key
    for (_, m, _) in &h {
        for k in [CA, CA_KEY, AGENT, AGENT_KEY, MASTER, MASTER_KEY] {
            assert!(m.files.contains_key(k), "{k} missing");
        }
    }
}

/// The control: a rotation that does not wait for kubelet (propagation
/// 0: the new CA and the certificates it issued in quick succession)
/// breaks trust between pods that see different versions, and the check
/// above says so.
#[test]
fn a_rotation_that_does_not_wait_is_caught() {
    let until = START + 25 * DAY;
    let h = history(&policy(0), until);
    let bad = violations(&h, 2 * 3600, until);
    assert!(
        bad.iter().any(|b| b.contains("CA rotation")),
        "a rotation without waiting must break an agent and an operator on different versions: {bad:#?}"
    );
}

#[test]
fn another_agent_name_gets_a_new_certificate_at_once() {
    let p = policy(3600);
    let Next::Write { material: m, .. } = next(START, None, &p).unwrap() else {
        panic!("nothing created")
    };
    assert_eq!(
        next(START + 60, Some(&m), &p).unwrap(),
        Next::Wait(START + 4 * DAY - 1200)
    );
    let mut p2 = p.clone();
    p2.agent_name = "agent.volmig.internal".into();
    let Next::Write { material: m2, step } = next(START + 60, Some(&m), &p2).unwrap() else {
        panic!("the agent certificate keeps the old name")
    };
    assert_eq!(step, "renewed agent.pem");
    assert_eq!(
        m2.files[MASTER], m.files[MASTER],
        "the master certificate stays"
    );
    assert_eq!(m2.files[CA], m.files[CA]);
    let server = WebPkiServerVerifier::builder_with_provider(roots(&m2), provider())
        .build()
        .unwrap();
    server
        .verify_server_cert(
            &leaf(&m2, AGENT),
            &[],
            &ServerName::try_from("agent.volmig.internal").unwrap(),
            &[],
            at(START + 120),
        )
        .unwrap();
}

#[test]
fn an_unusable_secret_starts_over() {
    let p = policy(3600);
    let Next::Write {
        material: mut m, ..
    } = next(START, None, &p).unwrap()
    else {
        panic!()
    };
    m.files.insert(CA_KEY.into(), "not a key".into());
    let Next::Write { material, step } = next(START + 10, Some(&m), &p).unwrap() else {
        panic!("kept an unusable Secret")
    };
    assert!(step.starts_with("created anew"), "{step}");
    reach(&material, &material, START + 20).unwrap();
}

#[tokio::test]
async fn the_secret_is_created_once_and_left_alone() {
    let (client, fake) = FakeApi::start();
    let p = Policy::new("volmig-agent");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let path = "/api/v1/namespaces/volmig-system/secrets/volmig-tls";
    let again = ensure(&client, "volmig-system", "volmig-tls", &p, now)
        .await
        .unwrap();
    assert!(
        again > now + 50 * DAY,
        "the next look is when renewal is due: {again}"
    );
    let s = fake.get(path).expect("the Secret");
    let keys: Vec<&str> = s["data"]
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    assert_eq!(
        keys,
        [
            "agent-key.pem",
            "agent.pem",
            "ca-key.pem",
            "ca.pem",
            "master-key.pem",
            "master.pem"
        ]
    );
    assert_eq!(
        s["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "volmig-operator"
    );
    let rv = s["metadata"]["resourceVersion"].clone();

    // nothing due: no write
    ensure(&client, "volmig-system", "volmig-tls", &p, now + 60)
        .await
        .unwrap();
    assert_eq!(fake.get(path).unwrap()["metadata"]["resourceVersion"], rv);

    // another replica writes between our read and our write: no error, and
    // the next look takes what is there
    fake.conflict_next("secrets/volmig-tls", 1);
    ensure(&client, "volmig-system", "volmig-tls", &p, now + 61 * DAY)
        .await
        .unwrap();
    ensure(&client, "volmig-system", "volmig-tls", &p, now + 61 * DAY)
        .await
        .unwrap();
    let renewed = fake.get(path).unwrap();
    assert_ne!(
        renewed["metadata"]["resourceVersion"], rv,
        "renewed when due"
    );
    assert_eq!(
        renewed["metadata"]["annotations"]["volmig.io/tls-last-step"],
        "renewed agent.pem, master.pem"
    );

    // all of it within the operator's RBAC: its Secret, by name
    let named = rbac::Named::new("volmig-operator", Some("volmig-tls"));
    rbac::check(&fake.requests_of(OPERATOR), "volmig-system", &named).unwrap();
}
