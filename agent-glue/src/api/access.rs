//! Who may use the API. The socket's mode (0600, root's) is the first gate; this
//! is the second, for sockets an operator opened up (chmod, ACL, a bind mount
//! into a container): every call is checked against the peer credentials the
//! kernel recorded at connect (`SO_PEERCRED`, which a client cannot forge).

use std::sync::Arc;

use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Status};
use tracing::warn;

/// The uids `--api-allow-uid` admits besides root.
#[derive(Debug, Clone, Default)]
pub struct Allowed(Arc<[u32]>);

impl Allowed {
    pub fn new(uids: &[u32]) -> Self {
        Allowed(uids.into())
    }

    /// `Ok` for root and the listed uids; otherwise PERMISSION_DENIED saying
    /// who was refused and how to admit them.
    pub fn check(&self, uid: Option<u32>, pid: Option<i32>) -> Result<(), Status> {
        let reason = match uid {
            Some(0) => return Ok(()),
            Some(u) if self.0.contains(&u) => return Ok(()),
            Some(u) => format!(
                "uid {u} may not use weir's API (allowed: root and the uids given with `weir run --api-allow-uid UID`)"
            ),
            // Only a non-unix transport lacks credentials; refuse rather than guess.
            None => "the caller's credentials are unknown (no SO_PEERCRED); refused".to_string(),
        };
        let pid = pid.unwrap_or(0);
        match uid {
            Some(uid) => warn!(uid, pid, reason = %reason, "API call refused"),
            None => warn!(pid, reason = %reason, "API call refused"),
        }
        Err(Status::permission_denied(reason))
    }
}

/// The tonic interceptor every service sits behind.
impl tonic::service::Interceptor for Allowed {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let cred = req
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|i| i.peer_cred);
        self.check(cred.map(|c| c.uid()), cred.and_then(|c| c.pid()))?;
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_and_listed_uids_pass_others_are_denied_with_the_way_in() {
        let none = Allowed::new(&[]);
        assert!(none.check(Some(0), Some(1)).is_ok());
        let e = none.check(Some(65534), Some(1)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("uid 65534"), "{}", e.message());
        assert!(e.message().contains("--api-allow-uid"), "{}", e.message());
        let some = Allowed::new(&[1000, 65534]);
        assert!(some.check(Some(65534), None).is_ok());
        assert!(some.check(Some(1001), None).is_err());
        assert_eq!(
            some.check(None, None).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
    }

    #[test]
    fn a_request_without_connect_info_is_refused() {
        use tonic::service::Interceptor;
        let mut a = Allowed::new(&[]);
        let e = a.call(Request::new(())).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
    }
}
