"""`python -m chat_app`: the same as the `mixtral-chat` command."""

import sys

from chat_app.cli import main

sys.exit(main())
