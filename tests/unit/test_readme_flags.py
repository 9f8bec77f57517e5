"""README.md's table of server flags is the parser's: every flag, each with its environment variable."""

from batchgate_server.settings import build_parser
from tests.readme import flag_table


def test_the_flag_table_lists_every_flag_of_the_server():
    parser_flags = {option for action in build_parser()._actions for option in action.option_strings
                    if option.startswith("--") and option != "--help"}
    table = flag_table()
    assert set(table) == parser_flags, f"missing: {parser_flags - set(table)}, not flags: {set(table) - parser_flags}"
    for flag, env in table.items():
        assert env == "BATCHGATE_" + flag.removeprefix("--").upper().replace("-", "_"), flag
