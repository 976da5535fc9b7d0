"""The documented import path of the kinematics: `from rehamot.kinematics import features_to_joints`.

The code lives in `rehamot.motion.kinematics`; this module re-exports its public names.
"""
from rehamot.motion.kinematics import LAYOUTS, Layout, features_to_joints, get_layout, yaw_rotate

__all__ = ["LAYOUTS", "Layout", "features_to_joints", "get_layout", "yaw_rotate"]
