//! Every write vkube makes names the one field manager (`vkube_core::contract::FIELD_MANAGER`).

use kube::api::{PatchParams, PostParams};
use vkube_core::contract::FIELD_MANAGER;

pub fn post_params() -> PostParams {
    PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() }
}

pub fn patch_params() -> PatchParams {
    PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() }
}
