"""``python -m talkrt.build_engines``: see ``talkrt.build_engines.cli``."""

from talkrt.build_engines.cli import main

raise SystemExit(main())
