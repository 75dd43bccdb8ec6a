"""The Typer application, and what every command shares: bad input as one line, SIGTERM cleanup."""

from __future__ import annotations

import os
import signal
import sys

import typer
from typer.core import TyperGroup

try:  # typer >= 0.24 carries its own copy of click
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover - older typer on the real click
    from click.exceptions import NoArgsIsHelpError, UsageError

from .. import distributed
from ..distributed import RankFailure
from ..errors import UserError


class Terminated(BaseException):
    """SIGTERM (a `timeout`, a container stop): unwinds like Ctrl-C, so no partial output stays."""


def _terminate(signum, _frame):
    raise Terminated(signum)


class OneLineErrors(TyperGroup):
    """Bad input (a UserError, or an option click rejects) ends in one line on stderr and exit 2;
    an interruption removes what was half-written (atomic_dir) and exits 130 / 143."""

    def main(self, *args, **kwargs):
        kwargs["standalone_mode"] = False
        previous = signal.signal(signal.SIGTERM, _terminate)
        try:
            distributed.start()
            if not distributed.is_main():  # the results are rank 0's to print
                sys.stdout = open(os.devnull, "w")
            code = super().main(*args, **kwargs)
        except NoArgsIsHelpError as err:
            err.show()
            code = 2
        except UsageError as err:
            # typer validates choices with pydantic, whose messages start "Value error, ".
            _error(err.format_message().replace("Value error, ", ""))
            code = 2
        except UserError as err:
            _error(str(err))
            code = 2
        except RankFailure as err:
            _error(str(err))
            code = 1
        except (KeyboardInterrupt, typer.Abort):
            _error("interrupted; nothing was written")
            code = 130
        except Terminated:
            # Under torchrun a SIGTERM is the launcher stopping every rank because one failed.
            why = " by the launcher, as another rank stopped" if distributed.active() else ""
            _error(f"terminated (SIGTERM){why}; nothing was written")
            code = 143
        finally:
            signal.signal(signal.SIGTERM, previous)
            distributed.stop()
        sys.exit(code if isinstance(code, int) else 0)


def _error(message: str) -> None:
    where = f" ({distributed.describe()})" if distributed.active() else ""
    print(f"error{where}: {message}", file=sys.stderr, flush=True)


app = typer.Typer(
    cls=OneLineErrors, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Prune transformer blocks with MI-PRUN and ship to edge runtimes.",
)
