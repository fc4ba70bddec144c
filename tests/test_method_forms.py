import dataclasses

from webui.method_forms import method_forms


def test_every_config_field_has_exactly_one_control_in_its_form():
    for form in method_forms():
        listed = form.top + [name for _, names, _ in form.groups for name in names]
        assert len(listed) == len(set(listed)), form.key
        assert not set(listed) & set(form.hidden), form.key
        assert set(listed) | set(form.hidden) == {f.name for f in dataclasses.fields(form.config)}, form.key
