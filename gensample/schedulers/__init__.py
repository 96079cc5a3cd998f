from .scheduling_consistency import ConsistencyScheduler, ConsistencySchedulerOutput

__all__ = ["ConsistencyScheduler", "ConsistencySchedulerOutput"]
