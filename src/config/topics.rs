//! MQTT topic templates such as `devices/{device}/state`: parsing, subscribing, matching,
//! filling.
//!
//! Pure. Parsed when the configuration is read (`[mqtt.topics]`), so the MQTT task holds
//! only usable templates and cannot fail on one.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A topic template with exactly one `{device}` level. In the configuration it is the string
/// it was parsed from.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct Template {
    levels: Vec<String>,
    device_level: usize,
}

impl Template {
    /// # Errors
    /// A sentence saying why the template is unusable.
    pub fn parse(template: &str) -> Result<Template, String> {
        if template.is_empty() {
            return Err("topic template is empty".into());
        }
        if template.contains(['+', '#', '\0']) {
            return Err("topic template must not contain MQTT wildcards (+ #) or NUL".into());
        }
        let levels: Vec<String> = template.split('/').map(str::to_owned).collect();
        let positions: Vec<usize> = levels
            .iter()
            .enumerate()
            .filter(|(_, l)| l.contains("{device}"))
            .map(|(i, _)| i)
            .collect();
        match positions.as_slice() {
            [i] if levels[*i] == "{device}" => Ok(Template {
                levels,
                device_level: *i,
            }),
            [_] => Err("{device} must be a whole topic level, as in devices/{device}/state".into()),
            [] => Err("topic template must contain {device}".into()),
            _ => Err("topic template must contain {device} once".into()),
        }
    }

    /// `devices/{device}/<leaf>`, the shape of the defaults. `leaf` is one plain topic level.
    pub(super) fn under_devices(leaf: &str) -> Template {
        Template {
            levels: vec!["devices".into(), "{device}".into(), leaf.into()],
            device_level: 1,
        }
    }

    /// The subscription filter: the template with `+` for the device.
    pub fn filter(&self) -> String {
        self.with_device("+")
    }

    /// The topic for one device.
    pub fn topic(&self, device: &str) -> String {
        self.with_device(device)
    }

    /// The device level of `topic`, if the topic has this template's shape.
    pub fn device_in<'t>(&self, topic: &'t str) -> Option<&'t str> {
        let mut found = None;
        let mut parts = topic.split('/');
        for (i, level) in self.levels.iter().enumerate() {
            let part = parts.next()?;
            if i == self.device_level {
                found = Some(part);
            } else if part != level {
                return None;
            }
        }
        if parts.next().is_some() {
            return None;
        }
        found
    }

    fn with_device(&self, device: &str) -> String {
        let mut levels = self.levels.clone();
        levels[self.device_level] = device.to_owned();
        levels.join("/")
    }
}

impl TryFrom<String> for Template {
    type Error = String;
    /// The error names the value; the configuration loader adds the key and the file.
    fn try_from(s: String) -> Result<Self, String> {
        Template::parse(&s).map_err(|problem| format!("{s:?}: {problem}"))
    }
}

impl From<Template> for String {
    fn from(t: Template) -> String {
        t.to_string()
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.with_device("{device}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_match_fill_and_subscribe() {
        let t = Template::parse("devices/{device}/state").unwrap();
        assert_eq!(t.filter(), "devices/+/state");
        assert_eq!(t.topic("s1"), "devices/s1/state");
        assert_eq!(t.device_in("devices/s1/state"), Some("s1"));
        assert_eq!(t.device_in("devices/s1/telemetry"), None);
        assert_eq!(t.device_in("devices/s1/state/extra"), None);
        assert_eq!(t.device_in("devices/s1"), None);
        assert_eq!(t.device_in("devices//state"), Some(""));
        let first = Template::parse("{device}/up").unwrap();
        assert_eq!(first.device_in("abc/up"), Some("abc"));
        assert_eq!(t.to_string(), "devices/{device}/state", "shown as written");
        assert_eq!(Template::under_devices("state"), t);
    }

    #[test]
    fn unusable_templates_are_refused() {
        for bad in [
            "",
            "devices/+/state",
            "devices/#",
            "devices/state",
            "d/{device}/{device}",
            "d/x{device}/s",
        ] {
            assert!(Template::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
