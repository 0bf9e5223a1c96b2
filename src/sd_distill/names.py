"""File names that several modules write or read, defined once (no torch: the serving code and the orchestrators
import it too)."""

MODEL_CARD = "distill.json"  # a distilled model folder's card: sampling steps, guidance range, where the UNet came from
PARAMS_RECORD = "params.resolved.json"  # the runner writes the stage's resolved params section into every output folder
