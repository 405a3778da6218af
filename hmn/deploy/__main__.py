"""``python -m hmn.deploy -i INPUT -o OUTPUT -m MODEL``: the MONAI Deploy application (:mod:`hmn.deploy.app`)."""

import sys

from hmn.deploy.app import main

if __name__ == "__main__":
    sys.exit(main())
