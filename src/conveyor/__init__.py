"""conveyor: process many items concurrently on trio, with retries, limits and an exact ledger.

Every item you hand to conveyor ends as exactly one of ``Succeeded``, ``Failed`` or
``Unfinished``: nothing is ever lost, also after a cancel. See README.md.
"""

# The pool and its three entry points.
from ._api import MapStream as MapStream
from ._api import map as map
from ._api import open_pool as open_pool
from ._api import run as run

# Observers that feed a tqdm bar or a rich display (tqdm and rich are imported when used).
from ._bars import RichProgress as RichProgress
from ._bars import TqdmProgress as TqdmProgress

# Errors: one tree under ConveyorError (see conveyor._errors).
from ._errors import AttemptTimeout as AttemptTimeout
from ._errors import ConveyorError as ConveyorError
from ._errors import ItemsFailed as ItemsFailed
from ._errors import ItemUnfinished as ItemUnfinished
from ._errors import JournalError as JournalError
from ._errors import JournalInvalid as JournalInvalid
from ._errors import JournalIOError as JournalIOError
from ._errors import NotPicklableError as NotPicklableError
from ._errors import RemoteError as RemoteError
from ._errors import RetryAfter as RetryAfter
from ._errors import WorkerDied as WorkerDied

# Limits held around every attempt.
from ._limits import Adaptive as Adaptive
from ._limits import PerKey as PerKey
from ._limits import Rate as Rate

# Observability: the observer seam and the live progress line.
from ._observe import Attempt as Attempt
from ._observe import LastReport as LastReport
from ._observe import Observer as Observer
from ._observe import PoolInfo as PoolInfo

# Heavy work off the event loop: threads and worker processes.
from ._offload import in_process as in_process
from ._offload import in_process_batched as in_process_batched
from ._offload import in_thread as in_thread

# Spans and metrics through the OpenTelemetry API (needs conveyor[otel], imported on use).
from ._otel import OpenTelemetry as OpenTelemetry

# Pipelines: stages, each a pool, with one ledger.
from ._pipeline import Batch as Batch
from ._pipeline import Pipeline as Pipeline
from ._pipeline import PipelineRun as PipelineRun
from ._pipeline import PipelineStream as PipelineStream
from ._pipeline import Stage as Stage
from ._pipeline import pipeline as pipeline
from ._pipeline import stage as stage

# (the pool, continued)
from ._pool import Pool as Pool
from ._pool_options import PoolOptions as PoolOptions  # run/map/open_pool's **options
from ._progress import Progress as Progress

# Prometheus metrics of pools: an observer (conveyor[prometheus], imported when created).
from ._prometheus import PrometheusMetrics as PrometheusMetrics

# What became of each item.
from ._records import Failed as Failed
from ._records import Record as Record
from ._records import Report as Report
from ._records import Succeeded as Succeeded
from ._records import Unfinished as Unfinished

# Retries.
from ._retry import Backoff as Backoff
from ._retry import Retry as Retry

# Observability.
from ._stats import Percentiles as Percentiles
from ._stats import Stats as Stats

__version__ = "0.1.0"

__all__ = [  # noqa: RUF022 - grouped by concept, like the imports above
    # the pool
    "AttemptTimeout",
    "MapStream",
    "Pool",
    "PoolOptions",
    "map",
    "open_pool",
    "run",
    # pipelines
    "Batch",
    "Pipeline",
    "PipelineRun",
    "PipelineStream",
    "Stage",
    "pipeline",
    "stage",
    # errors (one tree: see conveyor._errors)
    "ConveyorError",
    "JournalError",
    "JournalInvalid",
    "JournalIOError",
    # records
    "Failed",
    "ItemUnfinished",
    "ItemsFailed",
    "Record",
    "Report",
    "Succeeded",
    "Unfinished",
    # offload
    "NotPicklableError",
    "RemoteError",
    "WorkerDied",
    "in_process",
    "in_process_batched",
    "in_thread",
    # retries
    "Backoff",
    "Retry",
    "RetryAfter",
    # limits
    "Adaptive",
    "PerKey",
    "Rate",
    # observability
    "Attempt",
    "LastReport",
    "Observer",
    "OpenTelemetry",
    "PoolInfo",
    "Percentiles",
    "Progress",
    "RichProgress",
    "PrometheusMetrics",
    "Stats",
    "TqdmProgress",
]
