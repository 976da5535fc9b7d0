"""The documented import path of the kinematics: `from rehamot.kinematics import features_to_joints`.

The code lives in `rehamot.motion`; this module re-exports its public names: features to joints
(`motion.kinematics`), joints to HumanML3D features (`motion.features`) and other skeletons,
rates, axes and units onto HumanML3D's joints (`motion.skeletons`).
"""
from rehamot.motion.features import joints_to_features
from rehamot.motion.kinematics import LAYOUTS, Layout, features_to_joints, get_layout, yaw_rotate
from rehamot.motion.skeletons import SKELETONS, SMPL22_JOINTS, BadMotion, to_humanml3d_joints

__all__ = ["LAYOUTS", "SKELETONS", "SMPL22_JOINTS", "BadMotion", "Layout", "features_to_joints", "get_layout",
           "joints_to_features", "to_humanml3d_joints", "yaw_rotate"]
