"""Built-in methods: importing this package registers them all."""
from . import baselines  # noqa: F401
from . import obs, woodfisher  # noqa: F401
from . import obd, kfac  # noqa: F401
from . import llm_surgeon  # noqa: F401
from . import obc, sparsegpt, wanda  # noqa: F401
from . import greedy  # noqa: F401
