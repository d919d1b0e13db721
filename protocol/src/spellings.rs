//! How settings are spelled in resource files.

/// The spelling of each value of a setting in resource files (DRBD's), for fieldless enums:
/// `ALL`, `as_str` and `Display`. One macro for the wire's settings and the daemon's own.
#[macro_export]
macro_rules! option_spellings {
    ($ty:ident { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl $ty {
            /// Every value, in declaration order.
            pub const ALL: &'static [$ty] = &[$($ty::$variant),+];

            /// The value as written in a resource file.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $name),+
                }
            }
        }

        impl ::std::fmt::Display for $ty {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}
