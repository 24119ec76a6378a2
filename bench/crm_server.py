"""`python -m bench.crm_server serve`: the real server with the CRM rate limits raised.

The real limits (amoCRM 7 requests/s, Bitrix24 2/s) make a 1,000-deal update take
minutes by design: the CRM is the bound. To measure what this service adds on top, the
CRM scenarios run the same server code with the limiter raised to BENCH_CRM_RATE
(requests/s, default 100000) and compare the time with what the real limit would impose.
The benchmark sets CAPI_CRM_AMOCRM_RATE_PER_SECOND and CAPI_CRM_BITRIX24_RATE_PER_SECOND;
for a server whose Settings lack those knobs (CrmService then falls back to the module
defaults), the defaults are also replaced here before start-up.
"""

from __future__ import annotations

import os
import sys

from capi_server.__main__ import main
from capi_server.services import crm as crm_service


def raise_crm_rate_limits(rate_per_second: float) -> None:
    # CrmService reads these module globals when it is built, after this runs.
    setattr(crm_service, "AMOCRM_RATE_PER_SECOND", rate_per_second)  # noqa: B010
    setattr(crm_service, "BITRIX24_RATE_PER_SECOND", rate_per_second)  # noqa: B010
    setattr(crm_service, "BITRIX24_BURST", max(10, int(rate_per_second)))  # noqa: B010


if __name__ == "__main__":
    raise_crm_rate_limits(float(os.environ.get("BENCH_CRM_RATE", "100000")))
    sys.exit(main(sys.argv[1:]))
