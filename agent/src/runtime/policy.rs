//! The restart policy around a checkpoint: the engine applies a container's
//! restart policy when its process ends, and a checkpoint ends it. So the
//! source sets `no` right before the checkpoint, puts the original back if
//! the job rolls back, and the target creates its container with the
//! original policy (the create body carries it).

use bollard::models::{ContainerUpdateBody, RestartPolicy, RestartPolicyNameEnum};
use serde_json::Value;

use super::docker::engine_err;
use super::state::StateError;
use super::Docker;

/// The policy that never restarts.
pub fn no_restart() -> RestartPolicy {
    RestartPolicy {
        name: Some(RestartPolicyNameEnum::NO),
        maximum_retry_count: None,
    }
}

/// Whether the engine would start the container again after it ends.
pub fn restarts(policy: &RestartPolicy) -> bool {
    !matches!(
        policy.name,
        None | Some(RestartPolicyNameEnum::NO) | Some(RestartPolicyNameEnum::EMPTY)
    )
}

/// The restart policy a create body (a [`super::ContainerSpec`]'s) carries.
pub fn policy_in_body(create_body: &Value) -> RestartPolicy {
    create_body
        .get("HostConfig")
        .and_then(|h| h.get("RestartPolicy"))
        .and_then(|p| serde_json::from_value(p.clone()).ok())
        .unwrap_or_else(no_restart)
}

/// The update that sets `policy`; `MaximumRetryCount` only for on-failure
/// (the engine refuses it with any other name).
fn update_body(policy: &RestartPolicy) -> ContainerUpdateBody {
    let on_failure = policy.name == Some(RestartPolicyNameEnum::ON_FAILURE);
    ContainerUpdateBody {
        restart_policy: Some(RestartPolicy {
            name: Some(policy.name.unwrap_or(RestartPolicyNameEnum::NO)),
            maximum_retry_count: if on_failure {
                policy.maximum_retry_count
            } else {
                None
            },
        }),
        ..Default::default()
    }
}

impl Docker {
    /// The container's restart policy now.
    pub async fn restart_policy(&self, id: &str) -> Result<RestartPolicy, StateError> {
        let c = self
            .api()
            .inspect_container(id, None)
            .await
            .map_err(engine_err("inspect", id))?;
        Ok(c.host_config
            .and_then(|h| h.restart_policy)
            .unwrap_or_else(no_restart))
    }

    pub async fn update_restart_policy(
        &self,
        id: &str,
        policy: &RestartPolicy,
    ) -> Result<(), StateError> {
        self.api()
            .update_container(id, update_body(policy))
            .await
            .map_err(engine_err("update restart policy", id))?;
        Ok(())
    }

    /// Sets `no` unless it already is; returns the policy it had.
    pub async fn pause_restarts(&self, id: &str) -> Result<RestartPolicy, StateError> {
        let before = self.restart_policy(id).await?;
        if restarts(&before) {
            self.update_restart_policy(id, &no_restart()).await?;
        }
        Ok(before)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn policy_comes_from_the_create_body() {
        let body =
            json!({"HostConfig": {"RestartPolicy": {"Name": "always", "MaximumRetryCount": 0}}});
        let p = policy_in_body(&body);
        assert_eq!(p.name, Some(RestartPolicyNameEnum::ALWAYS));
        assert!(restarts(&p));
        let body = json!({"HostConfig": {"RestartPolicy": {"Name": "", "MaximumRetryCount": 0}}});
        assert!(!restarts(&policy_in_body(&body)));
        assert!(!restarts(&policy_in_body(&json!({}))));
        assert!(!restarts(&no_restart()));
    }

    #[test]
    fn retry_count_only_goes_with_on_failure() {
        let p = RestartPolicy {
            name: Some(RestartPolicyNameEnum::ON_FAILURE),
            maximum_retry_count: Some(3),
        };
        let u = update_body(&p).restart_policy.unwrap();
        assert_eq!(u.maximum_retry_count, Some(3));
        let p = RestartPolicy {
            name: Some(RestartPolicyNameEnum::ALWAYS),
            maximum_retry_count: Some(0),
        };
        let u = update_body(&p).restart_policy.unwrap();
        assert_eq!(u.maximum_retry_count, None);
        assert_eq!(u.name, Some(RestartPolicyNameEnum::ALWAYS));
        let u = update_body(&RestartPolicy::default())
            .restart_policy
            .unwrap();
        assert_eq!(u.name, Some(RestartPolicyNameEnum::NO));
    }
}
