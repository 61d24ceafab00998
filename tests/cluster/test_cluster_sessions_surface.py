"""LayerScale's session surface through the cluster: the single-server session tests, run
unchanged against `layerserve serve --replicas 2` (conftest.py gives them the cluster as
`session_server` and a client on it as `ls`). Left out: the --max-sessions test (the limit is
per replica, so a cluster of two holds twice as many) and the --api-key server (it starts a
single server of its own)."""

from test_session_sockets import (sid, test_async_socket,  # noqa: F401
                                  test_invalid_frames_get_error_events_and_the_socket_stays_open,
                                  test_refused_upgrades_are_typed_errors,
                                  test_sync_socket_push_ack_before_data_updated_ping_errors_close)
from test_sessions_client import (test_async_client_lifecycle_push_generate_events,  # noqa: F401
                                  test_bad_ids_and_duplicates, test_bad_push_and_generate_bodies,
                                  test_chat_turns_resume_from_the_session,
                                  test_create_default_and_custom_ids_window_pre_decode,
                                  test_delete_then_get_and_delete_again_are_404,
                                  test_events_connected_data_updated_flash_ready_and_replay,
                                  test_fast_answer_is_speculative_or_a_normal_answer,
                                  test_flash_answer_after_push_and_flash_hit,
                                  test_flash_clamps_max_tokens_and_caps_at_20,
                                  test_list_is_sorted_by_creation_and_get_reports_last_used,
                                  test_push_then_generate_is_ephemeral_and_cached,
                                  test_second_request_while_a_turn_is_in_flight_is_409,
                                  test_unknown_session_is_404_on_every_route,
                                  test_warm_then_covered_then_turn_resumes)
