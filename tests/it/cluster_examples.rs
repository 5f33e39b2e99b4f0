//! examples/kubernetes: the manifests parse as Kubernetes `batch/v1` Jobs (the fields used,
//! with their names and types as in the Job schema: an unknown or misspelt field fails), and
//! the Indexed Job, its shard command and the merge Job agree. (examples/slurm runs for real
//! on a single-node Slurm in CI: scripts/slurm-check.sh.)
use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Job {
    api_version: String,
    kind: String,
    metadata: Meta,
    spec: JobSpec,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Meta {
    name: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct JobSpec {
    completion_mode: Option<String>,
    completions: Option<u32>,
    parallelism: Option<u32>,
    backoff_limit: Option<u32>,
    backoff_limit_per_index: Option<u32>,
    template: PodTemplate,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PodTemplate {
    metadata: Option<Meta>,
    spec: PodSpec,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PodSpec {
    restart_policy: String,
    containers: Vec<Container>,
    volumes: Vec<Volume>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Container {
    name: String,
    image: String,
    command: Vec<String>,
    args: Vec<String>,
    #[serde(default)]
    env: Vec<EnvVar>,
    resources: Option<Resources>,
    volume_mounts: Vec<VolumeMount>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EnvVar {
    name: String,
    value: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Resources {
    requests: BTreeMap<String, String>,
    limits: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct VolumeMount {
    name: String,
    mount_path: String,
    sub_path: Option<String>,
    read_only: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Volume {
    name: String,
    persistent_volume_claim: Claim,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Claim {
    claim_name: String,
    read_only: Option<bool>,
}

fn job(file: &str) -> Job {
    let path = format!("{}/examples/kubernetes/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap();
    let job: Job = serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    assert_eq!(
        (job.api_version.as_str(), job.kind.as_str()),
        ("batch/v1", "Job")
    );
    assert!(job.metadata.name.is_some() && !job.metadata.labels.is_empty());
    let pod = &job.spec.template.spec;
    // a Job's pods may not restart "Always"
    assert!(["Never", "OnFailure"].contains(&pod.restart_policy.as_str()));
    for c in &pod.containers {
        assert!(!c.name.is_empty() && !c.image.is_empty() && !c.command.is_empty());
        for m in &c.volume_mounts {
            assert!(m.mount_path.starts_with('/'), "{}", m.mount_path);
            assert!(
                pod.volumes.iter().any(|v| v.name == m.name),
                "{file}: mount of an undeclared volume {}",
                m.name
            );
        }
        if let Some(r) = &c.resources {
            assert!(r.requests.contains_key("cpu"));
        }
    }
    for v in &pod.volumes {
        assert!(!v.persistent_volume_claim.claim_name.is_empty());
    }
    job
}

#[test]
fn kubernetes_examples_are_an_indexed_shard_job_and_its_merge() {
    let mine = job("mine-job.yaml");
    assert_eq!(mine.spec.completion_mode.as_deref(), Some("Indexed"));
    let n = mine.spec.completions.unwrap();
    assert!(mine.spec.parallelism.unwrap() <= n);
    assert!(mine.spec.backoff_limit_per_index.is_some());
    assert!(mine.spec.template.metadata.is_some());
    let c = &mine.spec.template.spec.containers[0];
    let script = c.args.join(" ");
    for part in [
        "medmine mine /project",
        "--shard \"${JOB_COMPLETION_INDEX}/${SHARDS}\"",
        "--shard-out \"/shards/shard-${JOB_COMPLETION_INDEX}\"",
    ] {
        assert!(script.contains(part), "{part}: {script}");
    }
    let shards = c.env.iter().find(|e| e.name == "SHARDS").unwrap();
    assert_eq!(shards.value, n.to_string(), "SHARDS = completions");
    let project = c
        .volume_mounts
        .iter()
        .find(|m| m.mount_path == "/project")
        .unwrap();
    assert_eq!(
        project.read_only,
        Some(true),
        "shard pods never write the project"
    );
    // project and shards: two folders of one shared claim
    let data: Vec<_> = c
        .volume_mounts
        .iter()
        .filter(|m| m.name == "data")
        .collect();
    assert_eq!(data.len(), 2);
    assert!(data.iter().all(|m| m.sub_path.is_some()));
    assert!(c.resources.as_ref().unwrap().limits.is_none());

    let merge = job("merge-job.yaml");
    assert_eq!(merge.spec.completions, Some(1));
    assert!(merge.spec.backoff_limit.is_some());
    let c = &merge.spec.template.spec.containers[0];
    let script = c.args.join(" ");
    assert!(
        script.contains("medmine project merge /project"),
        "{script}"
    );
    for k in 0..n {
        assert!(
            script.contains(&format!("/shards/shard-{k}")),
            "shard {k}: {script}"
        );
    }
    assert!(!script.contains(&format!("/shards/shard-{n}")), "{script}");
    let project = c
        .volume_mounts
        .iter()
        .find(|m| m.mount_path == "/project")
        .unwrap();
    assert_ne!(
        project.read_only,
        Some(true),
        "the merge writes the project"
    );
    assert!(merge.spec.template.spec.volumes[0]
        .persistent_volume_claim
        .read_only
        .is_none());
}
