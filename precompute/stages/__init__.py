"""The study's stages, in the order they run."""

from precompute.stages.backup import BackupStage
from precompute.stages.circuits import CircuitsStage
from precompute.stages.directions import DirectionsStage
from precompute.stages.evaluation import EvaluationStage
from precompute.stages.generate import GenerateStage
from precompute.stages.prompts import PromptsStage
from precompute.stages.saes import SaesStage
from precompute.stages.steering import SteeringStage
from precompute.stages.tradeoff import TradeoffStage
from precompute.stages.tune import TuneStage

STAGES = (PromptsStage(), TuneStage(), GenerateStage(), EvaluationStage(),
          DirectionsStage(), SaesStage(), SteeringStage(), CircuitsStage(), TradeoffStage(), BackupStage())
