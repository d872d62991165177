"""Environments for multi-turn rollouts: the protocol (reset / step / close / tools), adapters that run TRL and
skyrl-gym environments unchanged, safe tool calls, and token-exact trajectories. Above generate and rewards, below
online."""

from alignkit.envs.adapters import SkyRLEnvironment, ToolsEnvironment, TRLEnvironment
from alignkit.envs.base import EnvError, Environment, Limits, Step
from alignkit.envs.load import EnvironmentFactory, RoutedFactory, load_environment
from alignkit.envs.trajectory import Segment, Trajectory, run_trajectories

__all__ = ["EnvError", "Environment", "EnvironmentFactory", "Limits", "RoutedFactory", "Segment",
           "SkyRLEnvironment", "Step", "TRLEnvironment", "ToolsEnvironment", "Trajectory", "load_environment",
           "run_trajectories"]
