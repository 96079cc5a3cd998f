from .scheduling_consistency import ConsistencyScheduler, ConsistencySchedulerOutput
from .scheduling_ctm import CTMScheduler, CTMSchedulerOutput
from .scheduling_edm_heun import EDMHeunScheduler, EDMHeunSchedulerOutput
from .sigma_schedule import SigmaScheduleMixin

__all__ = ["ConsistencyScheduler", "ConsistencySchedulerOutput", "CTMScheduler", "CTMSchedulerOutput",
           "EDMHeunScheduler", "EDMHeunSchedulerOutput", "SigmaScheduleMixin"]
